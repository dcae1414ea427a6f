"""The answer cache read only, for `pipeline estimate --cache DIR`: which requests a run would
take from it now, and what those answers cost when bought (what the run would say it did not
spend). Never writes, never evicts, never marks an answer used, leaves no file beside it:
opened read-only (`pipeline.cache.readonly`: a cache on a read-only disk too), and a cache
that cannot be read is a note, the estimate counting every request as sent.

A request is looked up as a run looks it up: its key made from the payload with its local
images read and inlined (`imagedata.encode`, as the run sends them) and the endpoint's scope;
an answer the job's verdict now fails is no hit (the run would send the request).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import orjson

from pipeline.cache.broken import NewerFormat
from pipeline.cache.key import request_key
from pipeline.cache.pack import unpack
from pipeline.cache.readonly import open_read_only
from pipeline.cache.store import _GET, FILE, FORMAT, _id
from pipeline.errors import InputError, InvalidOutput
from pipeline.job import Request
from pipeline.send.verdict import Verdict


class Peek:
    """The answers kept at `folder`, looked at."""

    def __init__(self, folder: Path, *, scope: str, verdict: Verdict | None = None) -> None:
        self.folder, self.scope, self.verdict = folder, scope, verdict
        self.hits = 0  # requests whose answer is kept (and keeps the verdict)
        self.cost = 0.0  # what those cost when bought
        self.unpriced = 0  # of the hits, those whose cost was not known
        self.note: str | None = None  # why it could not be read, where it could not
        self._db = self._open(folder / FILE)

    def _open(self, path: Path) -> sqlite3.Connection | None:
        try:
            path.stat()  # (not is_file: a folder this process may not read is no missing one)
        except FileNotFoundError:
            if not self.folder.exists():
                self.note = f"no folder {self.folder}: no answer is kept there yet, every request is counted"
            else:
                self.note = f"{self.folder} holds no {FILE} yet: no answer is kept, every request is counted"
            return None
        except OSError as e:
            self.note = f"{path} cannot be read ({e.strerror or e}): every request is counted"
            return None
        try:
            return open_read_only(path, FORMAT)
        except (sqlite3.Error, NewerFormat) as e:
            what = f"made by another pipeline: {e}" if isinstance(e, NewerFormat) else str(e)
            self.note = f"{path} cannot be read ({what}): every request is counted"
        return None

    def held(self, request: Request) -> bool:
        """Whether the run would take the request's answer from the cache; counted."""
        if self._db is None:
            return False
        payload = request.payload
        if request.images:
            try:
                payload = _inlined(request)
            except InputError:
                return False  # (the run fails the line: the estimate lists it as it is)
        try:
            key = request_key(payload, scope=self.scope)
            row = self._db.execute(_GET, (_id(key),)).fetchone()
        except (ValueError, sqlite3.Error):
            return False
        if row is None or row[0] != key:
            return False
        try:
            body = orjson.loads(unpack(row[1], row[2]))
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        if self.verdict is not None:
            try:
                self.verdict.check(body)
            except InvalidOutput:
                return False
        self.hits += 1
        cost = row[4]
        if cost is None:
            self.unpriced += 1
        else:
            self.cost += float(cost)
        return True

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


def _inlined(request: Request) -> bytes:
    """The payload with its local images in, as the run sends it (the request untouched)."""
    from pipeline.input.imagedata import encode

    payload = request.payload
    for image in request.images or ():
        url, _, _ = encode(image)
        payload = payload.replace(image.marker, url, 1)
    return payload
