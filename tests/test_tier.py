"""The batch tier as the command line and the job file give it: its keys and flags, the prices a
batch pays, `pipeline estimate --tier batch`, and `pipeline cancel OUT`'s entry."""

from __future__ import annotations

import io
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pipeline.account.cost import answer_cost, money, price_for, tier_price, tier_prices
from pipeline.cli import main
from pipeline.errors import RunStopped, SettingsError
from pipeline.estimate import estimate
from pipeline.prices import Price
from pipeline.settings import build
from tests.conftest import bodies, write_jsonl

TOP = 'input = "in.jsonl"\noutput = "out"\n'


def job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(TOP + text)
    return path


# The keys and flags


def test_the_tier_is_sync_unless_a_job_file_or_a_flag_says_batch(tmp_path: Path) -> None:
    plain = build(job(tmp_path, ""))
    assert (plain.tier, plain.batch_api, plain.then, plain.batch_poll) == ("sync", None, None, 30.0)
    text = 'tier = "batch"\nbatch_api = "inline"\nthen = "sync"\nbatch_poll = 5\n'
    s = build(job(tmp_path, text))
    assert (s.tier, s.batch_api, s.then, s.batch_poll) == ("batch", "inline", "sync", 5)
    flagged = build(job(tmp_path, text), batch_api="files", batch_poll=0.5)
    assert (flagged.batch_api, flagged.batch_poll) == ("files", 0.5)
    # The job file keeps the batch tier's keys for the runs that use it; --tier sync wins.
    assert build(job(tmp_path, text), tier="sync").tier == "sync"


def test_the_flags_reach_the_settings(tmp_path: Path) -> None:
    from pipeline.cli import _parse
    from pipeline.parser import settings_from_args

    args = _parse(
        [
            *("run", "--input", "in.jsonl", "--tier", "batch", "--batch-api", "inline", "--then", "sync"),
            *("--batch-poll", "0.25"),
        ]
    )
    s = settings_from_args(args)
    assert (s.tier, s.batch_api, s.then, s.batch_poll) == ("batch", "inline", "sync", 0.25)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('tier = "Batch"\n', 'job.toml: tier must be "sync" or "batch", not \'Batch\''),
        ("tier = 1\n", "job.toml: 'tier' must be str, not 1"),
        ('batch_api = "file"\n', 'job.toml: batch_api must be "files" or "inline", not \'file\''),
        ('then = "batch"\n', "job.toml: then must be \"sync\", not 'batch'"),
        ("batch_poll = 0\n", "job.toml: batch_poll must be a number above 0, not 0"),
        ("batch_poll = 1" + "0" * 400 + "\n", "job.toml: batch_poll must be a number above 0, not 10"),
        ('batch_poll = "30"\n', "job.toml: 'batch_poll' must be int or float, not '30'"),
        ('teir = "batch"\n', "unknown key 'teir' \\(did you mean 'tier'\\?\\)"),
        ("batch_pol = 5\n", "unknown key 'batch_pol' \\(did you mean 'batch_poll'\\?\\)"),
    ],
)
def test_a_wrong_tier_key_is_named_with_what_it_may_be(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build(job(tmp_path, text))


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--then", "sync"], "pipeline: error: --then is for the batch tier: add --tier batch"),
        (["--batch-api", "inline"], "pipeline: error: --batch-api is for the batch tier"),
        (["--batch-poll", "5"], "pipeline: error: --batch-poll is for the batch tier"),
        (["--tier", "bach"], "argument --tier: invalid choice: 'bach'"),
        (["--tier", "batch", "--then", "later"], "argument --then: invalid choice: 'later'"),
        (["--tier", "batch", "--batch-poll", "0"], "argument --batch-poll: '0' must be above 0"),
        (["--tier", "batch", "--batch-pool", "5"], "unknown flag --batch-pool (did you mean --batch-poll?)"),
    ],
)
def test_a_wrong_tier_flag_exits_2_and_says_why(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    said: str,
) -> None:
    monkeypatch.delenv("LUMENFALL_API_KEY", raising=False)  # were the flags taken, nothing is sent
    src = write_jsonl(tmp_path / "in.jsonl", bodies(1))
    with pytest.raises(SystemExit) as ended:  # argparse's own refusals
        raise SystemExit(main(["run", "--input", str(src), "--output", str(tmp_path / "o"), *argv]))
    assert ended.value.code == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_batch_flag_beside_a_job_file_at_the_batch_tier_is_taken(tmp_path: Path) -> None:
    s = build(job(tmp_path, 'tier = "batch"\n'), then="sync")
    assert (s.tier, s.then) == ("batch", "sync")


def test_the_fingerprint_is_the_same_at_either_tier(tmp_path: Path) -> None:
    sync = build(job(tmp_path, ""))
    batch = build(job(tmp_path, 'tier = "batch"\nbatch_api = "files"\nthen = "sync"\nbatch_poll = 2\n'))
    assert sync.fingerprint() == batch.fingerprint()


# What a batch pays

PRICED = '[prices."a"]\nprompt = 1.0\ncompletion = 4.0\n[prices."b"]\nprompt = 2.0\ncompletion = 8.0\n'


def test_a_batch_share_halves_every_price(tmp_path: Path) -> None:
    s = build(job(tmp_path, 'tier = "batch"\n[prices]\nbatch = 0.5\n' + PRICED))
    assert tier_prices(s.prices, "batch") == {"a": Price(0.5, 2.0), "b": Price(1.0, 4.0)}
    assert dict(tier_prices(s.prices, "sync")) == {"a": Price(1.0, 4.0), "b": Price(2.0, 8.0)}
    assert dict(s.prices) == {"a": Price(1.0, 4.0), "b": Price(2.0, 8.0)}  # the table as ever
    assert tier_price(s.prices, "openrouter/b", "batch") == Price(1.0, 4.0)  # its other spelling
    assert s.warnings == ()


def test_a_models_batch_prices_beat_the_share_and_may_stand_alone(tmp_path: Path) -> None:
    text = (
        '[prices]\nbatch = 0.5\n[prices."a"]\nprompt = 1.0\ncompletion = 4.0\nbatch_prompt = 0.1\n'
        'batch_completion = 0.2\n[prices."b"]\nprompt = 2.0\ncompletion = 8.0\n'
        '[prices."c"]\nbatch_prompt = 3.0\nbatch_completion = 6.0\n'
    )
    s = build(job(tmp_path, 'tier = "batch"\n' + text))
    assert tier_prices(s.prices, "batch") == {
        "a": Price(0.1, 0.2),
        "b": Price(1.0, 4.0),
        "c": Price(3.0, 6.0),
    }
    # Priced for batches alone, c has no synchronous price: unknown, never $0.
    assert price_for(s.prices, "c") is None
    assert s.warnings == ()


def test_a_batch_answer_is_costed_at_the_batch_price_unless_the_server_says(tmp_path: Path) -> None:
    s = build(job(tmp_path, '[prices]\nbatch = 0.5\n[prices."a"]\nprompt = 1000.0\ncompletion = 1000.0\n'))
    body: dict[str, Any] = {"model": "a", "usage": {"prompt_tokens": 10, "completion_tokens": 10}}
    assert answer_cost(body, tier_prices(s.prices, "batch"), "a") == (pytest.approx(0.01), "price table")
    assert answer_cost(body, tier_prices(s.prices, "sync"), "a") == (pytest.approx(0.02), "price table")
    body["usage"]["cost"] = 0.003
    assert answer_cost(body, tier_prices(s.prices, "batch"), "a") == (0.003, "server")


def test_prices_that_say_nothing_of_batches_are_an_upper_bound_said_before_the_run(tmp_path: Path) -> None:
    s = build(job(tmp_path, 'tier = "batch"\n' + PRICED))
    assert tier_prices(s.prices, "batch") == {"a": Price(1.0, 4.0), "b": Price(2.0, 8.0)}
    (warning,) = s.warnings
    assert warning.startswith(f"{tmp_path / 'job.toml'}: [prices] says nothing of batches: costs are shown ")
    assert "at the synchronous price, an upper bound; add batch = 0.5" in warning
    # One model priced for batches: the other is named.
    partly = build(job(tmp_path, 'tier = "batch"\n' + PRICED + "batch_prompt = 1.0\n"))
    assert [w.split(": ", 1)[1] for w in partly.warnings] == [
        "[prices] says nothing of batches for a: their costs are shown at the synchronous price, an upper "
        "bound; add batch = 0.5 (the share of each price a batch pays) to [prices], or batch_prompt and "
        "batch_completion to a model's table"
    ]
    assert build(job(tmp_path, PRICED)).warnings == ()  # the sync tier: nothing to say
    assert build(job(tmp_path, 'tier = "batch"\n')).warnings == ()  # no [prices]: nothing shown at all


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[prices]\nbatch = 50\n", "\\[prices\\] batch is the share of each price a batch pays, from 0 to 1"),
        ('[prices]\nbatch = "half"\n', "from 0 to 1 \\(0.5 for half price\\), not 'half'"),
        (
            "[prices]\nbacth = 0.5\n",
            "job.toml: \\[prices\\]: unknown key 'bacth' \\(did you mean 'batch'\\?\\)",
        ),
        (
            '[prices]\n"m" = 0.5\n',
            "\\[prices\\] 'm' must be a table like .* or batch = 0.5 \\(the share of each price a batch pays\\)",
        ),
        (
            '[prices."m"]\nbatch_prompt = "x"\n',
            'prices."m"\\] batch_prompt and batch_completion must be numbers',
        ),
        ('[prices."m"]\nbatch_completion = -1\n', "prices cannot be negative"),
        ('[prices."m"]\nbatch_promt = 1\n', "unknown key 'batch_promt' \\(did you mean 'batch_prompt'\\?\\)"),
    ],
)
def test_a_wrong_batch_price_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build(job(tmp_path, text))


# pipeline estimate --tier batch


def _estimated(tmp_path: Path, text: str, *flags: str) -> tuple[int, str, str]:
    rows = bodies(3, model="a") + [{**b, "max_tokens": 50} for b in bodies(2, model="b", start=3)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out, err = io.StringIO(), io.StringIO()
    sys_out, sys_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["estimate", str(job(tmp_path, text)), *flags])
    finally:
        sys.stdout, sys.stderr = sys_out, sys_err
    return code, out.getvalue(), err.getvalue()


def _row(out: str, first: str) -> list[str]:
    """The cells of the table's row that begins with `first` (cells are two spaces apart)."""
    line = next(line for line in out.splitlines() if line.strip().startswith(first + " "))
    return re.split(r"\s{2,}", line.strip())


def test_estimate_at_the_batch_tier_shows_the_batch_price_beside_the_synchronous_one(tmp_path: Path) -> None:
    text = '[prices]\nbatch = 0.5\n[prices."a"]\nprompt = 1000.0\ncompletion = 1000.0\n'
    code, out, err = _estimated(tmp_path, text, "--tier", "batch")
    assert code == 0, err
    result = estimate(build(job(tmp_path, text)))
    a = result.models["a"]
    low, high = a.prompt_tokens / 1000, (a.prompt_tokens + a.completion_tokens) / 1000
    assert _row(out, "model")[-2:] == ["sync cost", "batch cost"]
    assert _row(out, "a")[-2:] == [f"{money(low)} to {money(high)}", f"{money(low / 2)} to {money(high / 2)}"]
    assert _row(out, "b")[-2:] == ["no price", "no price"]
    assert _row(out, "all")[-2:] == [
        f"{money(low)} to {money(high)} (priced models only)",
        f"{money(low / 2)} to {money(high / 2)} (priced models only)",
    ]
    assert 'no price for b: add [prices."b"]' in out
    # The plain estimate is as it was: one cost column.
    code, plain, _ = _estimated(tmp_path, text)
    assert _row(plain, "model")[-2:] == ["completion tokens (at most)", "cost"]
    assert _row(plain, "a")[-1] == f"{money(low)} to {money(high)}"
    assert "batch cost" not in plain


def test_estimate_of_a_batch_job_without_batch_prices_says_its_figure_is_the_sync_price(
    tmp_path: Path,
) -> None:
    text = 'tier = "batch"\n[prices."a"]\nprompt = 1000.0\ncompletion = 1000.0\n'
    # b is priced under its OpenRouter spelling: its figure is the sync price too, and says so.
    text += '[prices."openrouter/b"]\nprompt = 1.0\ncompletion = 1.0\n'
    code, out, err = _estimated(tmp_path, text)
    assert code == 0
    for model in ("a", "b"):
        sync, batch = _row(out, model)[-2:]
        assert batch == sync + " (sync price)"
    assert "[prices] says nothing of batches" in err


# pipeline cancel OUT


class FakeCancel:
    """`pipeline.batch.cancel.cancel_folder` (the batch run's), replaced: the calls it gets, and
    what it answers (an exit status, or an exception to raise)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str | None, str | None]] = []
        self.answer: int | BaseException = 0

    def __call__(self, folder: Path, base_url: str | None, api_key_env: str | None) -> int:
        self.calls.append((folder, base_url, api_key_env))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture
def cancel(monkeypatch: pytest.MonkeyPatch) -> FakeCancel:
    fake = FakeCancel()
    module = types.ModuleType("pipeline.batch.cancel")
    module.cancel_folder = fake  # type: ignore[attr-defined]
    package = sys.modules.get("pipeline.batch") or types.ModuleType("pipeline.batch")
    monkeypatch.setitem(sys.modules, "pipeline.batch", package)
    monkeypatch.setitem(sys.modules, "pipeline.batch.cancel", module)
    monkeypatch.setattr(package, "cancel", module, raising=False)
    return fake


def test_cancel_takes_the_folder_and_the_endpoint_from_flags_then_the_job_file(
    tmp_path: Path, cancel: FakeCancel, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    jobfile = job(tmp_path, 'base_url = "http://127.0.0.1:9/v1/"\napi_key_env = "MY_KEY"\n')
    cancel.answer = 1
    assert main(["cancel", str(out)]) == 1  # the status cancel_folder says
    assert main(["cancel", str(out), str(jobfile)]) == 1
    flags = ["--base-url", "http://localhost:8/v1", "--api-key-env", "K"]
    assert main(["cancel", str(out), str(jobfile), *flags]) == 1
    assert cancel.calls == [
        (out, None, None),  # neither: the batch run's own (the folder's, or the default)
        (out, "http://127.0.0.1:9/v1", "MY_KEY"),
        (out, "http://localhost:8/v1", "K"),
    ]
    cancel.answer = RunStopped("the key was refused (401)", code="auth")
    assert main(["cancel", str(out)]) == 3
    assert "pipeline cancel: stopped: the key was refused (401)" in capsys.readouterr().err
    cancel.answer = KeyboardInterrupt()
    assert main(["cancel", str(out)]) == 130
    assert "pipeline cancel: interrupted; run it again" in capsys.readouterr().err
    cancel.answer = ValueError("a bug")
    assert main(["cancel", str(out)]) == 70
    assert "pipeline cancel: internal error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--base-url", "ftp://x"], "pipeline cancel: error: base URL 'ftp://x' is not an http(s) URL"),
        (["--api-key-env", "sk-123"], "pipeline cancel: error: api_key_env must be the name of"),
        (["missing.toml"], "pipeline cancel: error: missing.toml: job file not found"),
    ],
)
def test_cancel_with_a_wrong_endpoint_or_job_file_exits_2_and_calls_nothing(
    tmp_path: Path,
    cancel: FakeCancel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["cancel", "out", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err
    assert "sk-123" not in err  # a key passed for its variable's name is never echoed
    assert cancel.calls == []


def test_help_lists_the_tier_flags_and_the_cancel_command(capsys: pytest.CaptureFixture[str]) -> None:
    def helped(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return capsys.readouterr().out

    assert "cancel    cancel the batches a --tier batch run left running in OUT" in helped()
    for command in ("run", "estimate"):
        text = helped(command)
        for flag in (
            "--tier {sync,batch}",
            "--batch-api {files,inline}",
            "--then {sync}",
            "--batch-poll SECONDS",
        ):
            assert flag in text
    assert (
        "usage: pipeline cancel [-h] [--base-url BASE_URL] [--api-key-env API_KEY_ENV] out [job]"
        in " ".join(helped("cancel").split())
    )
    # Given neither, cancel reaches the endpoint the folder's batches went to, as it says.
    assert "the endpoint (default: the one OUT's batch run used, else https://" in " ".join(
        helped("cancel").split()
    )
    with pytest.raises(SystemExit) as ended:
        main(["cancel"])
    assert ended.value.code == 2
    assert "the following arguments are required: out" in capsys.readouterr().err


def test_ray_refuses_a_job_file_at_the_batch_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # ray takes no --tier, but its shards build their settings from the job file: each would
    # submit batches into its own folder, where pipeline cancel OUT does not look.
    import pipeline.cluster.driver as driver

    started: list[object] = []
    monkeypatch.setattr(driver, "ray_command", lambda *args: started.append(args) or 0)
    jobfile = job(tmp_path, 'tier = "batch"\n')
    assert main(["ray", str(jobfile), "--shards", "2"]) == 2
    assert started == []
    err = capsys.readouterr().err
    assert f'pipeline: error: {jobfile}: tier = "batch" is for pipeline run' in err
    assert 'set tier = "sync" to run this job on the cluster' in err
    assert main(["ray", str(job(tmp_path, "batch_poll = 5\n")), "--shards", "2"]) == 0  # sync: as before
    assert len(started) == 1
