"""The mock's batches: how each moves through its states, and what it ends with.

A batch's state is computed from `config.clock` at each look, never kept by a task: it is
validating for `batch_validating` seconds, in progress for `batch_seconds` (its lines done
evenly across them, `request_counts` following), finalizing for `batch_finalizing`, then
completed. It fails at the end of validating when its lines broke a rule
(`batchlines.check_lines`); it expires `batch_expire_after` seconds after its creation with
the lines done so far; cancelled, it is cancelling for `batch_cancelling` seconds with the
lines done when asked, then cancelled. Tests move a fake clock instead of sleeping.

Once a look finds it ended, its lines are answered to disk (`batchlines.answer_lines`, in a
worker thread, once): the output and error files of OpenAI's shape, or the results of the
inline shape (indexed, `batchpages`), and the mock's counters (`state.BatchTally`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.mock.batchlines import Answered, Checked, answer_lines, check_lines
from pipeline.mock.batchpages import Pages
from pipeline.mock.config import MockConfig
from pipeline.mock.files import FileStore
from pipeline.mock.state import MockState

ENDPOINT = "/v1/chat/completions"
WINDOW = 24 * 3600  # the completion window, "24h"
ENDED = ("completed", "failed", "expired", "cancelled")
MAX_LINES = {"files": 50_000, "inline": 5_000}  # OpenAI's limit; OpenRouter's "up to 5,000 requests"
MAX_BYTES = 200 * 1024 * 1024


@dataclass
class Ending:
    """What an ended batch holds: its files (files shape) or results (inline), and its usage."""

    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: Pages | None = None
    usage: dict[str, float] | None = None


@dataclass
class MockBatch:
    id: str
    number: int
    shape: str
    config: MockConfig
    created: float
    source: Path  # the batch's own copy of its lines (OpenAI batch input lines)
    checked: Checked
    model: str | None
    metadata: dict[str, Any] | None  # as kept
    input_file_id: str | None = None
    cancel_at: float | None = None
    ending: Ending | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def run_start(self) -> float:
        return self.created + self.config.batch_validating

    @property
    def run_end(self) -> float:
        return self.run_start + self.config.batch_seconds

    @property
    def expires(self) -> float | None:
        """When it expires, if its lines are not all done by then."""
        after = self.config.batch_expire_after
        if after is None or self.checked.errors or self.created + after >= self.run_end:
            return None
        return self.created + after

    def done_at(self, when: float) -> int:
        """Lines run by `when`: evenly across the time in progress."""
        total = self.checked.lines
        if when < self.run_start:
            return 0
        if self.config.batch_seconds <= 0 or when >= self.run_end:
            return total
        return math.floor(total * (when - self.run_start) / self.config.batch_seconds)

    def status_at(self, now: float) -> tuple[str, int]:
        """Its status at `now`, and how many of its lines have run."""
        if self.cancel_at is not None:
            done = self.done_at(self.cancel_at)
            return (
                "cancelling" if now < self.cancel_at + self.config.batch_cancelling else "cancelled"
            ), done
        if self.checked.errors:
            return ("validating" if now < self.run_start else "failed"), 0
        expires = self.expires
        if expires is not None and now >= expires:
            return "expired", self.done_at(expires)
        if now < self.run_start:
            return "validating", 0
        if now < self.run_end:
            return "in_progress", self.done_at(now)
        if now < self.run_end + self.config.batch_finalizing:
            return "finalizing", self.checked.lines
        return "completed", self.checked.lines

    def counts(self, status: str, done: int) -> dict[str, int]:
        ok = self.checked.ok_among(done)
        # OpenAI counts a file's lines once validated; the inline shape knows them when posted.
        unread = self.shape == "files" and status in ("validating", "failed")
        return {"total": 0 if unread else self.checked.lines, "completed": ok, "failed": done - ok}

    def times(self, status: str) -> dict[str, int | None]:
        """OpenAI's timestamps (whole seconds, as providers send them)."""

        def at(when: float | None, reached: bool) -> int | None:
            return int(when) if when is not None and reached else None

        stopped = self.cancel_at if self.cancel_at is not None else self.expires
        ran = (
            not self.checked.errors
            and status != "validating"
            and (stopped is None or stopped >= self.run_start)
        )
        final = status in ("finalizing", "completed")
        after = self.config.batch_expire_after
        return {
            "created_at": int(self.created),
            "in_progress_at": at(self.run_start, ran),
            "expires_at": int(self.created + (after if after is not None else WINDOW)),
            "finalizing_at": at(self.run_end, final),
            "completed_at": at(self.run_end + self.config.batch_finalizing, status == "completed"),
            "failed_at": at(self.run_start, status == "failed"),
            "expired_at": at(self.expires, status == "expired"),
            "cancelling_at": at(self.cancel_at, self.cancel_at is not None),
            "cancelled_at": at((self.cancel_at or 0) + self.config.batch_cancelling, status == "cancelled"),
        }


class Batches:
    """Every batch the mock was given, newest last."""

    def __init__(self, config: MockConfig, files: FileStore, state: MockState) -> None:
        self.config, self.files, self.state = config, files, state
        self.tally = state.batch
        self.batches: dict[str, MockBatch] = {}
        self.numbers = itertools.count(1)  # not len(batches): two made at once, or one deleted

    def limits(self, shape: str) -> tuple[int, int]:
        cfg = self.config
        return cfg.batch_max_lines or MAX_LINES[shape], cfg.batch_max_bytes or MAX_BYTES

    def keeps_metadata(self, shape: str) -> bool:
        kept = self.config.batch_metadata
        return shape == "files" if kept is None else kept

    async def make(
        self,
        shape: str,
        source: Path,
        *,
        model: str | None,
        metadata: dict[str, Any] | None,
        input_file_id: str | None = None,
    ) -> MockBatch:
        """A new batch of the lines at `source` (its own copy), checked as a provider would."""
        cfg = self.config
        number = next(self.numbers)
        max_lines, max_bytes = self.limits(shape)
        checked = await asyncio.to_thread(
            check_lines,
            source,
            endpoint=ENDPOINT,
            model=model,
            max_lines=max_lines,
            max_bytes=max_bytes,
            fail_rate=cfg.batch_fail_rate,
            rng=random.Random(f"{cfg.seed}:batch:{number}"),
            unknown_models=cfg.unknown_models,
            text_only=shape == "inline",  # OpenRouter's batches take no image, audio or file
        )
        batch = MockBatch(
            id=f"batch_mock{number:08d}",
            number=number,
            shape=shape,
            config=cfg,
            created=cfg.clock(),
            source=source,
            checked=checked,
            model=checked.model,
            metadata=metadata if self.keeps_metadata(shape) else None,
            input_file_id=input_file_id,
        )
        self.batches[batch.id] = batch
        self.tally.created += 1
        tag = (metadata or {}).get("pipeline_tag")  # counted as sent, kept or not
        if isinstance(tag, str):
            self.tally.by_tag[tag] += 1
        if checked.errors:
            self.tally.failed_validation += 1
        return batch

    def cancel(self, batch: MockBatch) -> str | None:
        """Ask `batch` to cancel; None, or why it cannot."""
        status, _ = batch.status_at(self.config.clock())
        if status in ("cancelling", "cancelled"):
            return None
        if status in ENDED:
            return f"Cannot cancel a batch with status {status!r}."
        batch.cancel_at = self.config.clock()
        self.tally.cancels += 1
        return None

    async def look(self, batch: MockBatch) -> tuple[str, int]:
        """Its status now and lines run; an ended batch's lines are answered first (once)."""
        status, done = batch.status_at(self.config.clock())
        if status in ENDED and batch.ending is None:
            async with batch.lock:
                if batch.ending is None:
                    batch.ending = await self._end(batch, status, done)
        return status, done

    async def settle(self) -> None:
        """Answer every batch that has ended and was not looked at since."""
        for batch in list(self.batches.values()):
            await self.look(batch)

    async def _end(self, batch: MockBatch, status: str, done: int) -> Ending:
        if batch.checked.errors:  # failed at validation, or cancelled before: no line ran
            return Ending(status)
        cfg = self.config
        stopped = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        inline = batch.shape == "inline"
        out_id, out_path = self.files.new_path()
        err_id, err_path = (out_id, out_path) if inline else self.files.new_path()
        answered = await asyncio.to_thread(
            _write,
            batch,
            done,
            out_path,
            err_path,
            stopped=stopped,
            inline=inline,
            cost=cfg.cost,
            chatty_when=cfg.chatty_when,
            uncached=bool(cfg.prefix_cache),
        )
        self.tally.answered.update(answered.custom_ids)
        self.tally.failed_lines += answered.failed
        self.tally.never_run += answered.never_run
        self.state.answered.update(
            answered.keys
        )  # so that a line paid in a batch and again synchronously shows
        if inline:  # (indexed by line, in a worker thread too: a provider serves pages from an index)
            return Ending(status, results=await asyncio.to_thread(Pages, out_path), usage=answered.usage)
        name = batch.id.removeprefix("batch_")
        # OpenAI makes no file that would be empty (and names none).
        output = self.files.kept(out_id, out_path, filename=f"{name}_output.jsonl", purpose="batch_output")
        errors = self.files.kept(err_id, err_path, filename=f"{name}_error.jsonl", purpose="batch_output")
        return Ending(status, output_file_id=output, error_file_id=errors, usage=answered.usage)


def _write(
    batch: MockBatch,
    done: int,
    out_path: Path,
    err_path: Path,
    *,
    stopped: str | None,
    inline: bool,
    cost: bool,
    chatty_when: str | None,
    uncached: bool,
) -> Answered:
    name = str(batch.number)
    lines, outcomes = batch.source, batch.checked.outcomes
    options: dict[str, Any] = {
        "name": name,
        "stopped": stopped,
        "inline": inline,
        "cost": cost,
        "chatty_when": chatty_when,
        "uncached": uncached,
    }
    with out_path.open("wb") as out:
        if err_path == out_path:
            return answer_lines(lines, outcomes, done, out=out, err=out, **options)
        with err_path.open("wb") as err:
            return answer_lines(lines, outcomes, done, out=out, err=err, **options)
