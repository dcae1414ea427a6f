"""A redo of what needs it (issue 23, points 1 and 4): a captioning job at `max_tokens = 30`
leaves 3 % of its 10,000 answers cut short (`finish_reason: "length"`); the same job at 120,
run into the same folder with `--redo length`, sends those lines alone. Judged: the redo sends
3 % of the lines and costs about 3 % of the first run (not 100 %, as `--fresh` would), and the
folder ends with one answer a line and the replaced ones in superseded.jsonl. The mock reports
each answer's cost, and cuts an answer longer than the request's max_tokens."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import orjson

from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import Client, ClientRun
from bench.scenarios import Done, Options, _lost_check, _run, _slug
from pipeline.mock.answers import completion

LINES = 10_000
CUT_SHARE = 0.03  # of the lines, cut short at the first run's max_tokens
FIRST_MAX, REDO_MAX = 30, 120
MODEL = "openai/gpt-4o-mini"
LATENCY_MS = 50.0


def _input(folder: Path, lines: int) -> tuple[Path, int]:
    """`folder/redo-N.jsonl`: `lines` captioning requests, CUT_SHARE of them answered past
    FIRST_MAX tokens by the mock (chosen by the mock's own answer), and how many."""
    path = folder / f"redo-{lines}.jsonl"
    cut_wanted = round(lines * CUT_SHARE)
    folder.mkdir(parents=True, exist_ok=True)
    cut = kept = n = 0
    with path.open("wb") as out:
        while cut + kept < lines:
            n += 1
            body = {
                "custom_id": f"img-{n:06d}",
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Caption photo {n} in one sentence."}],
            }
            long = completion({**body, "max_tokens": FIRST_MAX})["choices"][0]["finish_reason"] == "length"
            if long and cut < cut_wanted:
                cut += 1
            elif not long and kept < lines - cut_wanted:
                kept += 1
            else:
                continue
            out.write(orjson.dumps(body) + b"\n")
    return path, cut


def _job(folder: Path, max_tokens: int) -> Path:
    path = folder / f"captions-{max_tokens}.toml"
    path.write_text(f"[request]\nmax_tokens = {max_tokens}\n")
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def redo(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    lines = max(int(LINES * opts.scale), 100)
    inputs = opts.out / "inputs"
    path, cut = _input(inputs, lines)
    flags = MockFlags(latency_ms=LATENCY_MS)
    first_client = Client(
        name="pipeline max_tokens 30", kind="pipeline", flags=(str(_job(inputs, FIRST_MAX)),)
    )
    first = _run("redo", opts, first_client, path, flags)
    folder = opts.out / "runs" / "redo" / _slug(first_client) / "output"
    paid_first = float(orjson.loads((folder / "usage.json").read_bytes())["cost"]["total"] or 0.0)
    # The redo goes into the first run's folder (a later --output wins over the harness's own).
    again = Client(
        name="pipeline --redo length, max_tokens 120",
        kind="pipeline",
        flags=(str(_job(inputs, REDO_MAX)), "--redo", "length", "--output", str(folder)),
    )
    second: ClientRun = _run("redo", opts, again, path, flags)
    usage = orjson.loads((folder / "usage.json").read_bytes())
    paid_both = float(usage["cost"]["total"] or 0.0)
    paid_redo = paid_both - paid_first
    share = paid_redo / paid_first if paid_first else float("inf")
    sent = int(second.mock.get("statuses", {}).get("200", 0))
    results = _lines(folder / "results.jsonl")
    ids = {orjson.loads(raw)["custom_id"] for raw in results}
    still_cut = sum(b'"finish_reason":"length"' in raw for raw in results)
    superseded = _lines(folder / "superseded.jsonl")
    # (the harness counted its own output folder, empty: the redo's lines are in the first's)
    second = dataclasses.replace(second, succeeded=sent, lost=lines - len(ids))
    checks = [
        Check("answers cut short by the first run", f"{cut:,} of {lines:,}", f"{CUT_SHARE:.0%}", cut > 0),
        Check("requests the redo sent / lines cut", f"{sent:,} / {cut:,}", "equal", sent == cut),
        Check(
            "dollars the redo paid / the first run",
            f"${paid_redo:.4f} / ${paid_first:.4f} ({share:.1%})",
            f"about {CUT_SHARE:.0%} (≤ {2 * CUT_SHARE:.0%})",
            0 < share <= 2 * CUT_SHARE,
        ),
        Check(
            "results.jsonl lines / ids / still cut",
            f"{len(results):,} / {len(ids):,} / {still_cut:,}",
            f"{lines:,} / {lines:,} / 0",
            len(results) == len(ids) == lines and still_cut == 0,
        ),
        Check("superseded.jsonl lines", f"{len(superseded):,}", f"{cut:,}", len(superseded) == cut),
        Check(
            "usage.json: redone lines / the dollars they had cost",
            f"{usage['redo']['lines']:,} / ${usage['redo']['superseded_cost']:.4f}",
            f"{cut:,}",
            usage["redo"]["lines"] == cut,
        ),
        _lost_check(first),
        _lost_check(second),
    ]
    title = (
        f"{lines:,} captions at max_tokens {FIRST_MAX}, then --redo length at {REDO_MAX} into the same "
        f"folder; mock: {flags.describe()}"
    )
    notes = [
        "the redo runs into the first run's folder; its succeeded are the lines it sent, its lost the "
        "ids the folder lacks after it",
        "the redone lines are the longest answers (cut short for it): their new answers cost more "
        "than the average line, so the redo's share of the dollars is above its share of the lines",
        "--fresh would have paid for every line again: 100 % of the first run",
    ]
    shutil.rmtree(opts.out / "runs" / "redo" / _slug(again) / "output", ignore_errors=True)
    return ScenarioResult("redo", title, runs=[first, second], checks=checks, notes=notes, load_before=load)


SCENARIOS = {"redo": redo}
