"""`batch_max_lines` and `batch_max_bytes` (`--batch-max-lines`, `--batch-max-bytes`): a batch's
limits where a provider's are below the shape's own (Azure, Groq, a gateway); a value above
the shape's own is refused at start, exit 2, before anything is uploaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.batch.clock import Clock
from pipeline.errors import SettingsError
from pipeline.run.host import Host
from pipeline.run.runner import run
from pipeline.settings import Settings, build
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.fakebatchapi import FakeClock, at_batch_tier


class RealClient(Host):
    """The run's own host (its batch client, opened from the settings), on a fake clock."""

    batch_clock: Clock | None = FakeClock()


async def _stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url.rsplit("/v1", 1)[0] + "/mock/stats") as r:
        stats: dict[str, Any] = await r.json()
        return stats["batch"]


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_batches_are_cut_at_the_limits_the_settings_give(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], shape: str
) -> None:
    # The mock, as a provider that takes two lines a batch: a batch of more fails whole.
    async with mock(batch_api=shape, batch_max_lines=2) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(5)), batch_api=shape, batch_max_lines=2)
        summary = await run(settings, RealClient())
        assert summary.exit_code == 0, summary.message
        assert len(read_jsonl(settings.folder / "results.jsonl")) == 5
        stats = await _stats(url)
        assert (stats["batches_created"], stats["failed_validation"]) == (3, 0)


async def test_batch_max_bytes_cuts_by_size(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    async with mock(batch_api="files", batch_max_bytes=400) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(4)), batch_api="files", batch_max_bytes=400)
        summary = await run(settings, RealClient())
        assert summary.exit_code == 0, summary.message
        stats = await _stats(url)
        assert stats["failed_validation"] == 0
        assert stats["batches_created"] >= 2  # (about 170 bytes a line)


@pytest.mark.parametrize(
    ("shape", "key", "value", "said"),
    [
        ("files", "batch_max_lines", 50_001, "batch_max_lines is 50,001, above the files batch API's own limit of 50,000"),
        ("inline", "batch_max_lines", 5_001, "above the inline batch API's own limit of 5,000 a batch"),
        ("files", "batch_max_bytes", 200_000_001, "batch_max_bytes is 200,000,001, above the files"),
    ],
)  # fmt: skip
async def test_a_limit_above_the_shape_s_own_is_exit_2_before_anything_is_uploaded(
    mock: Callable[..., Any],
    make_settings: Callable[..., Settings],
    shape: str,
    key: str,
    value: int,
    said: str,
) -> None:
    async with mock(batch_api=shape) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(3)), batch_api=shape, **{key: value})
        with pytest.raises(SettingsError, match=said):
            await run(settings, RealClient())
        stats = await _stats(url)
        assert (stats["files_uploaded"], stats["batches_created"]) == (0, 0)


def test_the_keys_and_flags_reach_the_settings(tmp_path: Path) -> None:
    from pipeline.cli import _parse
    from pipeline.parser import settings_from_args

    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\ntier = "batch"\nbatch_max_lines = 100\nbatch_max_bytes = 5000000\n')
    s = build(job)
    assert (s.batch_max_lines, s.batch_max_bytes) == (100, 5_000_000)
    args = _parse(["run", str(job), "--batch-max-lines", "7", "--batch-max-bytes", "9000"])
    s = settings_from_args(args)
    assert (s.batch_max_lines, s.batch_max_bytes) == (7, 9000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_max_lines = 0\n", "job.toml: batch_max_lines must be a whole number above 0, not 0"),
        ("batch_max_bytes = 1.5\n", "job.toml: 'batch_max_bytes' must be int, not 1.5"),
        ("batch_max_line = 5\n", "unknown key 'batch_max_line' \\(did you mean 'batch_max_lines'\\?\\)"),
    ],
)
def test_a_wrong_limit_is_named(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\n' + text)
    with pytest.raises(SettingsError, match=message):
        build(job)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--batch-max-lines", "5"], "pipeline: error: --batch-max-lines is for the batch tier"),
        (["--tier", "batch", "--batch-max-bytes", "0"], "argument --batch-max-bytes: '0' must be above 0"),
    ],
)
def test_a_wrong_limit_flag_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    from pipeline.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", bodies(1))
    with pytest.raises(SystemExit) as ended:  # argparse's own refusals
        raise SystemExit(main(["run", "--input", str(src), "--output", str(tmp_path / "out"), *argv]))
    assert ended.value.code == 2
    assert said in capsys.readouterr().err
