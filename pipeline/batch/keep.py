"""The answers a batch brings, kept in the answer cache (`--cache DIR`) at the batch price, so
that a later run, at either tier, takes them instead of paying again.

Each answer is kept under the key of its request as staged: read back from the batch's own
file (OUT/batches/<n>.jsonl, kept until the batch is taken in), where the payload sits as it
was sent, local images inlined. The keys are made once a batch, in a thread, before its
results are read; the answers are queued as the intake writes them, and written to the cache
in a thread as they come (`Reuse.flush_if_due`: a batch of 50,000 answers would otherwise
fill the queue, which then flushes itself in the event loop).

Only a source of answers: the ledger alone says what is done. Killed before the cache is
written, the answers are not kept (a later run pays for them again); kept and the run killed
before the batch is committed taken, the next run takes the batch in again and writes what
is not done, as without a cache: a line of a live batch is never looked up, nor staged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import orjson

from pipeline.batch.stage import _BODY, _HEAD
from pipeline.cache.key import request_key
from pipeline.job import Success
from pipeline.send.reuse import Reuse


class Keep:
    def __init__(self, reuse: Reuse, fresh: Callable[[str], bool] | None = None) -> None:
        self.reuse = reuse
        self.fresh = fresh  # the ids a --redo chose: their new answer replaces the kept one
        self.keys: dict[str, bytes] = {}  # the batch being taken in's: custom_id -> key

    async def read(self, staged: Path, keys: dict[str, bytes] | None = None) -> None:
        """The keys of the lines of the batch file `staged` (none where it cannot be read);
        `keys`: those read already (the batch has twins, `pipeline.batch.twins`)."""
        self.keys = {}
        if self.reuse.cache.keeping:
            if not keys:
                keys = await anyio.to_thread.run_sync(keys_of, staged, self.reuse.scope)
            self.keys = keys

    def put(self, successes: Sequence[Success]) -> None:
        """Queue the answers written (each kept the verdict) to be kept."""
        for success in successes:
            key = self.keys.get(success.request.custom_id)
            if key is not None:
                if self.fresh is not None and self.fresh(success.request.custom_id):
                    self.reuse.cache.reject(key)
                self.reuse.keep(key, success, tier="batch")

    def done(self) -> None:
        self.keys = {}


def keys_of(staged: Path, scope: str) -> dict[str, bytes]:
    """custom_id -> the key of its request, for every line of a batch file."""
    keys: dict[str, bytes] = {}
    try:
        with staged.open("rb") as f:
            for data in f:
                line = _line(data)
                if line is None:
                    continue
                custom_id, payload = line
                try:
                    keys[custom_id] = request_key(payload, scope=scope)
                except ValueError:
                    continue
    except OSError:
        return keys  # (only a cache: what was read is kept, the rest is not)
    return keys


def _line(data: bytes) -> tuple[str, bytes] | None:
    """A staged line's id and payload, cut from its bytes as `stage.batch_line` wrote them
    (the custom_id a JSON string: no unescaped quote of the marker can sit inside it);
    parsed whole where it is not of that shape."""
    at = data.find(_BODY)
    end = data.rstrip(b"\r\n")
    if data.startswith(_HEAD) and at > 0 and end.endswith(b"}"):
        try:
            custom_id = orjson.loads(data[len(_HEAD) : at])
        except orjson.JSONDecodeError:
            custom_id = None
        if isinstance(custom_id, str):
            return custom_id, end[at + len(_BODY) : -1]
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("custom_id"), str)
        or not isinstance(obj.get("body"), dict)
    ):
        return None
    return obj["custom_id"], orjson.dumps(obj["body"])
