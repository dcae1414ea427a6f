"""A provider's batch API in memory, for the batch tier's tests: it can be told to die at any
of its steps (a `Killed`, a BaseException as a SIGKILL would end the run there), what each
line's answer is, and it counts what it ran, so a test proves nothing was paid twice.

Steps, each counted once a clean run passes it: check, find, submit (before the batch is
made, and after it is made but before its id is returned), get, and every result line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from pipeline.batch.clock import Clock
from pipeline.errors import ConnectionDropped
from pipeline.run.control import Control
from pipeline.run.host import Host
from pipeline.run.progress import Progress
from pipeline.send.batchapi import BatchApi, BatchCounts, BatchInfo, Flaw
from pipeline.send.batchwire import one_line
from pipeline.settings import Settings


class Killed(BaseException):
    """The run dies here, as a SIGKILL would end it."""


def answer(custom_id: str, model: str, content: str | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{custom_id}",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content or f"answer to {custom_id}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }


# A line's fate at the n-th batch it is in: "ok", "500", "400", "expired", "missing",
# "stranger" (ok, plus a line for an id never sent), "twice" (ok, sent back twice), "invalid"
# (its batch fails validation, an error naming its line), or any other text: an ok answer
# whose content is that text.
Fate = Callable[[str, int], str]


@dataclass
class _Batch:
    info: BatchInfo
    lines: list[tuple[str, dict[str, Any]]]  # (custom_id, body)
    tries: dict[str, int]
    looks: int = 0


class FakeBatchApi(BatchApi):
    shape = "files"

    def __init__(
        self,
        *,
        max_lines: int = 1000,
        max_bytes: int = 1 << 30,
        fate: Fate | None = None,
        looks_to_end: int = 1,
        end_as: str = "completed",
    ) -> None:
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.fate = fate or (lambda custom_id, n: "ok")
        self.looks_to_end = looks_to_end
        self.end_as = end_as
        self.batches: dict[str, _Batch] = {}
        self.ran: Counter[str] = Counter()  # lines run (paid), by custom_id
        self.made = 0
        self.steps = 0  # steps passed
        self.die_at: int | None = None  # die at this step (1: the first)
        self.step_names: list[str] = []
        self.has_api = True
        self.cancelled: list[str] = []
        self.cleared: list[str] = []  # batches whose leavings were deleted, in order
        self.fail_made: dict[int, tuple[str, ...]] = {}  # batch made n-th -> its errors: failed so
        self.cut_at: int | None = None  # the download of results drops at this line, once
        self.on_get: Callable[[], None] | None = None  # called at each look (a test interrupts there)
        self.invalid: tuple[str, ...] = ("line 2: the body is not valid JSON",)  # a failed batch's errors

    def _step(self, name: str) -> None:
        self.steps += 1
        self.step_names.append(name)
        if self.die_at is not None and self.steps == self.die_at:
            self.die_at = None
            raise Killed(name)

    async def check(self) -> None:
        from pipeline.send.batchapi import NoBatchApi

        if not self.has_api:
            raise NoBatchApi("no batch API")
        await anyio.lowlevel.checkpoint()

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        self._step("submit")
        rows = [orjson.loads(raw) for raw in (await anyio.Path(staged).read_bytes()).splitlines()]
        assert len(rows) == lines
        assert all(row["body"]["model"] == model for row in rows)  # one model a batch
        self.made += 1
        tries: dict[str, int] = {}
        for row in rows:
            self.ran[row["custom_id"]] += 1
            tries[row["custom_id"]] = self.ran[row["custom_id"]]
        info = BatchInfo(
            f"batch_{self.made}", "validating", BatchCounts(lines), tag, model, 1.7e9 + self.made
        )
        self.batches[info.id] = _Batch(info, [(r["custom_id"], r["body"]) for r in rows], tries)
        self._step("submitted")
        await anyio.lowlevel.checkpoint()
        return info

    async def find(
        self,
        tag: str,
        *,
        since: float,
        model: str | None = None,
        lines: int | None = None,
        taken: Collection[str] = (),
    ) -> BatchInfo | None:
        self._step("find")
        await anyio.lowlevel.checkpoint()
        for batch in self.batches.values():
            if batch.info.tag == tag:
                return batch.info
        return None

    async def get(self, batch_id: str) -> BatchInfo:
        self._step("get")
        if self.on_get is not None:
            self.on_get()
        await anyio.lowlevel.checkpoint()
        batch = self.batches[batch_id]
        batch.looks += 1
        if batch.looks >= self.looks_to_end and not batch.info.ended:
            total = len(batch.lines)
            made = int(batch_id.rsplit("_", 1)[1])
            flaws = tuple(
                Flaw("invalid_request", f"{custom_id} is invalid", "body", number)
                for number, (custom_id, _) in enumerate(batch.lines, 1)
                if self.fate(custom_id, batch.tries[custom_id]) == "invalid"
            )
            if self.end_as == "failed" or made in self.fail_made or flaws:  # at validation: nothing ran
                errors = tuple(one_line(flaw) for flaw in flaws) or self.fail_made.get(made, self.invalid)
                batch.info = batch.info._replace(
                    status="failed", counts=BatchCounts(total), errors=errors, flaws=flaws
                )
                for custom_id, _ in batch.lines:
                    self.ran[custom_id] -= 1
            else:
                batch.info = batch.info._replace(status=self.end_as, counts=BatchCounts(total, total, 0))
        elif not batch.info.ended:
            batch.info = batch.info._replace(status="in_progress")
        return batch.info

    async def cancel(self, batch_id: str) -> BatchInfo:
        self.cancelled.append(batch_id)
        batch = self.batches[batch_id]
        batch.info = batch.info._replace(status="cancelled")
        return batch.info

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        self._step("clear")
        await anyio.lowlevel.checkpoint()
        self.cleared.append(batch_id)

    async def results(self, info: BatchInfo) -> AsyncIterator[bytes]:
        batch = self.batches[info.id]
        for index, custom_id_body in enumerate(batch.lines):
            custom_id, body = custom_id_body
            fate = self.fate(custom_id, batch.tries[custom_id])
            if info.status == "cancelled" and index >= len(batch.lines) // 2:
                fate = "cancelled"  # the first half ran before the cancel reached it
            for line in _lines(custom_id, body["model"], fate):
                if self.cut_at is not None and index + 1 == self.cut_at:
                    self.cut_at = None
                    raise ConnectionDropped("the download was cut")
                self._step("line")
                await anyio.lowlevel.checkpoint()
                yield orjson.dumps(line)


def _lines(custom_id: str, model: str, fate: str) -> list[dict[str, Any]]:
    ok = {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{custom_id}", "body": answer(custom_id, model)},
        "error": None,
    }
    if fate == "ok":
        return [ok]
    if fate in ("500", "400", "429"):
        error = {"error": {"message": f"fake {fate}", "type": "server_error", "code": None}}
        return [{**ok, "response": {"status_code": int(fate), "request_id": None, "body": error}}]
    if fate == "expired":
        return [{**ok, "response": None, "error": {"code": "batch_expired", "message": "the batch expired"}}]
    if fate == "cancelled":
        return [{**ok, "response": None, "error": {"code": "batch_cancelled", "message": "cancelled"}}]
    if fate == "missing":
        return []
    if fate == "stranger":
        return [ok, {**ok, "custom_id": f"stranger-{custom_id}"}]
    if fate == "twice":
        return [ok, ok]
    content = {**ok, "response": {**ok["response"], "body": answer(custom_id, model, fate)}}  # type: ignore[dict-item]
    return [content]


class FakeClock(Clock):
    """Time that moves only when the batch run waits for it; not at all while `held()` (a
    wait is then for its wake alone)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.held: Callable[[], bool] = lambda: False

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1.7e9 + self.t

    async def wait(self, seconds: float | None, wake: anyio.Event) -> None:
        if seconds is None or self.held():
            await wake.wait()
            return
        self.t += seconds
        await anyio.lowlevel.checkpoint()


class FakeHost(Host):
    def __init__(self, api: FakeBatchApi) -> None:
        self.api = api
        self.batch_clock = FakeClock()
        self.control: Control | None = None
        self.progress: Progress | None = None

    async def watch(self, control: Control, progress: Progress) -> None:
        self.control = control  # (no signals: a test interrupts through it)
        self.progress = progress

    def staging(self) -> bool:
        """Whether the run's input is still being staged (its follower's `staging`)."""
        batches = self.progress.batches if self.progress is not None else None
        return batches is None or bool(getattr(batches, "staging", False))

    def batch_api(
        self, settings: Settings, api_key: str | None
    ) -> contextlib.AbstractAsyncContextManager[BatchApi]:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[BatchApi]:
            yield self.api

        return opened()


def at_batch_tier(settings: Settings, **extra: Any) -> Settings:
    return dataclasses.replace(settings, tier="batch", **extra)


def stopping_at_a_look(api: FakeBatchApi) -> FakeHost:
    """A host whose run is interrupted (as by Ctrl-C) at its next look at a batch."""
    host = FakeHost(api)

    def interrupt() -> None:
        assert host.control is not None
        host.control.interrupt()

    api.on_get = interrupt
    return host
