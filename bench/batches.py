"""The batch tier (issue 22, point 6): `pipeline run --tier batch` on 10,000 and 100,000 lines
against the mock serving each batch API shape (files: OpenAI's, 50,000 lines a batch;
inline: OpenRouter's, 5,000), each batch taking a set time at the mock.

Judged: the peak RSS of the 100,000-line run over the 10,000-line one's (flat: output files
streamed, never held whole), and the merge of a batch's output into results.jsonl, in lines
a second. Shown: the run's wall against the mock's time, split along the batch that was taken
in last (the critical path), from the run's own timing of its steps (`bench.batchtrace`):

    before      start-up, reading and staging the lines, uploading and creating the batches,
                up to that batch made
    the mock    the time a batch takes at the mock (validating + in progress + finalizing)
    following   from the batch's end at the mock to the look that found it ended: the poll's
                granularity (and, with many batches, at most one look a second in all)
    answering   that look's reply: the mock writing the batch's answers once a look finds it
                ended (a provider has them ready: the mock's cost, not the tool's)
    taking in   `Intake.take`: download, judging, results.jsonl, the books, the commit
    end         from then to the process's exit (usage.json, report.md, report.html)

`--scale` multiplies the line counts (0.1: 1,000 and 10,000 lines); BENCH_BATCHES picks
shapes, comma-separated (BENCH_BATCHES=files runs the files shape alone).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.inputs import input_file
from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import Client, ClientRun, trace
from bench.scenarios import Done, Options, _run, _slug

SHAPES = ("files", "inline")
LINES = (10_000, 100_000)
ENDED = ("completed", "failed", "expired", "cancelled")
FLAT = 1.2  # the most the larger run's peak RSS may be, as a multiple of the smaller's
MERGE_RATE = 50_000.0  # lines a second taken into results.jsonl, at least
POLL = 2.0  # --batch-poll


def _flags(shape: str) -> MockFlags:
    return MockFlags(batch_api=shape, batch_validating=1.0, batch_seconds=8.0, batch_finalizing=1.0)


@dataclass(frozen=True)
class Taken:
    """One batch of a run, as the run's own timing saw it (epoch seconds)."""

    id: str
    lines: int
    made: float  # the create call answered
    submitted: float  # seconds its submission took (upload and create)
    seen: float  # the look that found it ended began
    answered: float  # ... and got its reply
    began: float  # taking in began (`Intake.take`)
    ended: float  # ... and ended: every line in the files, committed
    read: float  # seconds from its first result line read to its last
    cpu: float  # the process's CPU seconds while it was taken in

    def merge_rate(self) -> float:
        return self.lines / max(self.ended - self.began, 1e-9)


@dataclass(frozen=True)
class Split:
    """A run's wall, split along the batch taken in last (see the module's text)."""

    wall: float
    batch_time: float
    before: float
    following: float
    answering: float
    taking: float
    end: float
    submissions: float  # the submissions' seconds, all batches (within `before`)
    batches: list[Taken]

    @property
    def own(self) -> float:
        """The tool's own share of the wall: neither the mock's batch time nor its answering."""
        return self.wall - self.batch_time - self.answering


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _split(events: list[dict[str, Any]], *, wall: float, batch_time: float) -> Split | None:
    """None when the run was not timed (a seam renamed: the trace says `untimed`)."""
    by = {e["event"]: e for e in events if e["event"] in ("start", "exit", "untimed")}
    if "untimed" in by or "start" not in by or "exit" not in by:
        return None
    submits = {e["id"]: e for e in events if e["event"] == "submit"}
    reads = {e["id"]: e for e in events if e["event"] == "results"}
    taken: list[Taken] = []
    for take in (e for e in events if e["event"] == "take"):
        bid, submit, read = take["id"], submits.get(take["id"]), reads.get(take["id"])
        # the first look that found it ended (the mock answers its lines then)
        look = next(
            (e for e in events if e["event"] == "look" and e["id"] == bid and e["status"] in ENDED), None
        )
        if submit is None or read is None or look is None:
            continue  # (a batch found again, or failed: none here)
        taken.append(
            Taken(
                id=bid,
                lines=read["lines"],
                made=submit["ended"],
                submitted=submit["ended"] - submit["began"],
                seen=look["began"],
                answered=look["ended"],
                began=take["began"],
                ended=take["ended"],
                read=(read["ended"] - read["first"]) if read["first"] is not None else 0.0,
                cpu=take.get("cpu", 0.0),
            )
        )
    if not taken:
        return None
    last = max(taken, key=lambda t: t.ended)
    startup = wall - (by["exit"]["at"] - by["start"]["at"])  # the interpreter's, before the trace began
    ready = last.made + batch_time
    return Split(
        wall=wall,
        batch_time=batch_time,
        before=startup + last.made - by["start"]["at"],
        following=last.seen - ready,
        answering=last.answered - last.seen,
        taking=last.ended - last.answered,
        end=by["exit"]["at"] - last.ended,
        submissions=sum(e["ended"] - e["began"] for e in submits.values()),
        batches=sorted(taken, key=lambda t: t.made),
    )


def _describe(split: Split) -> str:
    return (
        f"wall {split.wall:.1f} s = before {split.before:.2f} (submissions {split.submissions:.2f})"
        f" + the mock {split.batch_time:g} + following {split.following:.2f}"
        f" + answering {split.answering:.2f} + taking in {split.taking:.2f} + end {split.end:.2f}"
    )


def _batch_lines(split: Split) -> str:
    taken = split.batches
    waits = [t.seen - (t.made + split.batch_time) for t in taken]
    rates = [t.merge_rate() for t in taken]
    cpu = sum(t.cpu for t in taken) / max(sum(t.ended - t.began for t in taken), 1e-9)
    per_line = 1e6 * sum(t.cpu for t in taken) / max(sum(t.lines for t in taken), 1)
    return (
        f"{len(taken)} batch{'es' if len(taken) != 1 else ''} of {min(t.lines for t in taken):,} to"
        f" {max(t.lines for t in taken):,} lines; submission {min(t.submitted for t in taken):.2f} to"
        f" {max(t.submitted for t in taken):.2f} s; found ended {min(waits):.2f} to {max(waits):.2f} s"
        f" after the mock's end; taken in at {min(rates):,.0f} to {max(rates):,.0f} lines/s, on the CPU"
        f" {cpu:.0%} of that time ({per_line:.1f} us a line)"
    )


def _merge(split: Split) -> tuple[float, float]:
    """Lines a second taken in, over the run's batches: from `take`'s start to its commit, and
    from the first result line read to the last: the reader's pace, not the merge's (lines are
    read ahead of their judging and writing, by up to four runs of 512 and a page: the whole
    take is the figure)."""
    lines = sum(t.lines for t in split.batches)
    whole = sum(t.ended - t.began for t in split.batches)
    read = sum(t.read for t in split.batches)
    return lines / max(whole, 1e-9), lines / max(read, 1e-9)


def batches(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    small, large = (max(1, round(n * opts.scale)) for n in LINES)
    runs: list[ClientRun] = []
    checks: list[Check] = []
    notes: list[str] = []
    picked = [name for name in os.environ.get("BENCH_BATCHES", "").split(",") if name]
    for shape in SHAPES:
        if picked and shape not in picked:
            continue
        flags = _flags(shape)
        pair: list[tuple[ClientRun, Split | None]] = []
        for lines in (small, large):
            client = Client(
                name=f"pipeline --tier batch, {shape}, {lines:,} lines",
                kind="pipeline",
                flags=("--tier", "batch", "--batch-api", shape, "--batch-poll", f"{POLL:g}"),
                traced=True,
            )
            run = _run("batches", opts, client, input_file(opts.out / "inputs", lines), flags)
            folder = opts.out / "runs" / "batches" / _slug(client)
            split = _split(_events(trace(folder)), wall=run.measurement.wall, batch_time=flags.batch_time)
            runs.append(run)
            pair.append((run, split))
            tally = run.mock.get("batch", {})
            checks += [
                Check(f"{client.name}: lost", f"{run.lost:,}", "0", run.lost == 0),
                Check(
                    f"{client.name}: answered twice, batches made twice (mock)",
                    f"{tally.get('lines_answered_twice', '?')}, {tally.get('tags_twice', '?')}",
                    "0, 0",
                    tally.get("lines_answered_twice") == 0 and tally.get("tags_twice") == 0,
                ),
            ]
            if split is None:
                checks.append(Check(f"{client.name}: split of the wall", "not timed (see its trace.jsonl)"))
                continue
            run.said["batch_split"] = dataclasses.asdict(split)  # (kept in results.json with the run)
            whole, read = _merge(split)
            judged = lines == large  # the figure: the larger run's (100,000 lines at scale 1)
            checks += [
                Check(
                    f"{client.name}: merged into results.jsonl, take to commit (first to last line read)",
                    f"{whole:,.0f} lines/s ({read:,.0f})",
                    f"≥ {MERGE_RATE:,.0f}" if judged else None,
                    whole >= MERGE_RATE if judged else None,
                ),
                Check(
                    f"{client.name}: wall − the mock's {split.batch_time:g} s",
                    f"{split.wall - split.batch_time:.2f} s, of which the tool's own {split.own:.2f} s"
                    f" and the mock's answering {split.answering:.2f} s",
                ),
            ]
            notes += [f"{client.name}: {_describe(split)}", f"  {_batch_lines(split)}"]
        (few, _), (many, _) = pair
        ratio = many.measurement.peak_rss_mb / max(few.measurement.peak_rss_mb, 1e-9)
        checks.append(
            Check(
                f"{shape}: peak RSS, {large:,} lines / {small:,} lines",
                f"{many.measurement.peak_rss_mb:.1f} / {few.measurement.peak_rss_mb:.1f} MB = {ratio:.2f}x",
                f"≤ {FLAT:g}x",
                ratio <= FLAT,
            )
        )
    after = os.getloadavg()
    title = (
        f"pipeline run --tier batch --batch-poll {POLL:g}, {small:,} and {large:,} lines; mock: each batch"
        f" {_flags('files').batch_time:g} s (1 s validating, 8 s in progress, 1 s finalizing); files"
        " (50,000 lines a batch) and inline (5,000)"
    )
    notes += [
        "the split follows the batch taken in last; before: start-up, reading, staging, uploading and"
        " creating, to that batch made; following: its end at the mock to the look that found it ended"
        " (the poll; with many batches at most one look a second in all); answering: that look's"
        " reply, the mock writing the batch's answers (a provider has them ready); taking in: download,"
        " judging, results.jsonl, the books, the commit; end: usage.json and the reports, to exit",
        "merged: lines over the seconds of `Intake.take` (download to commit), all the run's batches;"
        " in brackets, over the seconds from each batch's first result line read to its last (the"
        " reader's pace: it reads up to four runs of 512 lines and a page ahead of the judging and"
        " writing, so this is not the merge)",
        f"load average after: {', '.join(f'{x:.2f}' for x in after)}",
    ]
    return ScenarioResult("batches", title, runs, checks, notes, load_before=load)


SCENARIOS = {"batches": batches}
