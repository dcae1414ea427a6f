"""What a batch API sends, read: its batch objects (as `BatchInfo`), its result lines (split
out of a download, bounded in length), and a finished inline batch's status without its
answers. No HTTP here (`batchhttp` speaks it); only bytes and JSON.

The two shapes' objects, as the providers document them:

    files (OpenAI)   {"id", "object": "batch", "status", "created_at", "request_counts":
                     {"total", "completed", "failed"}, "metadata", "input_file_id",
                     "output_file_id", "error_file_id", "errors": {"data": [{"code",
                     "message", "line"}]} | null, ...}
    inline           {"id", "object": "batch", "status", "created_at", "model",
      (OpenRouter)   "request_counts", "usage", "results": [...] | null, "error":
                     {"message"} | null, "finalized_at"}: no metadata kept
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from pipeline.errors import MalformedResponse
from pipeline.input.jsonl import dumps
from pipeline.quote import brief
from pipeline.send.batchapi import TAG_KEY, BatchCounts, BatchInfo, Flaw

HEAD = 1 << 16  # bytes kept of a line too long to keep: enough to name it


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def info_of(obj: Any) -> BatchInfo:
    """A batch object as `BatchInfo`; a body that is no batch is a `MalformedResponse`."""
    if not isinstance(obj, dict) or not _text(obj.get("id")) or not _text(obj.get("status")):
        raise MalformedResponse("the answer is not a batch: no id or status", body=brief(str(obj)))
    counts = obj.get("request_counts")
    if isinstance(counts, dict):
        n = BatchCounts(
            _count(counts.get("total")), _count(counts.get("completed")), _count(counts.get("failed"))
        )
    else:
        n = BatchCounts()
    metadata = obj.get("metadata")
    created = obj.get("created_at")
    flaws = _errors(obj)
    return BatchInfo(
        id=obj["id"],
        status=obj["status"],
        counts=n,
        tag=_text(metadata.get(TAG_KEY)) if isinstance(metadata, dict) else None,
        model=_text(obj.get("model")),
        created_at=float(created)
        if isinstance(created, int | float) and not isinstance(created, bool)
        else None,
        input_file=_text(obj.get("input_file_id")),
        output_file=_text(obj.get("output_file_id")),
        error_file=_text(obj.get("error_file_id")),
        errors=tuple(one_line(flaw) for flaw in flaws),
        flaws=flaws,
    )


def _errors(obj: dict[str, Any]) -> tuple[Flaw, ...]:
    """Why a batch failed: OpenAI's `errors.data` (one a line of the input, each with its
    `code`, `message`, `param` and `line`), or the inline shape's one `error.message`. The
    code is kept: not every failure is the lines' fault (`token_limit_exceeded`: the
    organisation's enqueued tokens were spent by batches still running, and the same batch
    passes once they end)."""
    flaws: list[Flaw] = []
    errors = obj.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    for item in data if isinstance(data, list) else ():
        if isinstance(item, dict):
            line = item.get("line")
            code, message = _brief(item.get("code")), _brief(item.get("message"))
            flaws.append(
                Flaw(
                    code and code[:200],
                    message or code or "invalid",
                    _brief(item.get("param")),
                    line if isinstance(line, int) and not isinstance(line, bool) else None,
                )
            )
    error = obj.get("error")
    if isinstance(error, dict) and error.get("message"):
        flaws.append(Flaw(None, brief(str(error["message"])) or "invalid"))
    return tuple(flaws)


def _brief(value: Any) -> str | None:
    """A text a provider gave, on one line and bounded; None for none, or no text."""
    return (brief(value) or None) if isinstance(value, str) else None


def one_line(flaw: Flaw) -> str:
    """A flaw in one line of text: `line 2: code: message`."""
    where = f"line {flaw.line}: " if flaw.line is not None else ""
    why = f"{flaw.code}: {flaw.message}" if flaw.code and flaw.code != flaw.message else flaw.message
    return brief(f"{where}{why}")


def output_line(item: Any) -> bytes:
    """An inline batch's result as a line of OpenAI's batch output shape (`output_item`)."""
    return dumps(output_item(item))


def output_item(item: Any) -> dict[str, Any]:
    """An inline batch's result as an object of OpenAI's batch output shape, parsed already
    (a page of results is read whole: its lines are not encoded to be parsed again).
    OpenRouter's is that shape already, but for its error object's keys (`message`, `type`,
    `param`: no `code`); one without an error is given as it came, not copied (what is read
    of it is its `custom_id` and `response`: a copy a line was 4 % of taking a batch in)."""
    if isinstance(item, dict) and item.get("error") is None:
        return item
    if not isinstance(item, dict):
        item = {
            "custom_id": None,
            "response": None,
            "error": {"code": "malformed", "message": brief(str(item))},
        }
    error = item.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type") or "batch_error"
        error = {**error, "code": code, "message": str(error.get("message") or code)}
    elif error is not None:
        error = {"code": "batch_error", "message": brief(str(error))}
    return {
        "id": item.get("id"),
        "custom_id": item.get("custom_id"),
        "response": item.get("response"),
        "error": error,
    }


_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


def too_long_line(head: bytes, size: int, limit: int) -> bytes | None:
    """A result line too long to keep, as an error line for its id when its first bytes name
    it (OpenAI's lines begin with `id` and `custom_id`); None when they do not: its id then
    reads as left undone."""
    found = _CUSTOM_ID.search(head)
    if found is None:
        return None
    try:
        custom_id = orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return None
    message = f"the result line is {size:,} bytes, over the limit of {limit:,} (max_line_bytes)"
    error = {"code": "line_too_long", "message": message}
    return dumps({"id": None, "custom_id": custom_id, "response": None, "error": error})


class LineSplitter:
    """Whole lines out of a download's chunks, each with the bytes it took (its newline too).
    A line over `limit` bytes is read past, never held: it comes as None, with its head."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._head = b""  # the first bytes of a line over the limit

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes | None, int, bytes]]:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._add(chunk[start : end + 1])
            yield self._take()
            start = end + 1
        if start < len(chunk):
            self._add(chunk[start:] if start else chunk)

    def end(self) -> Iterator[tuple[bytes | None, int, bytes]]:
        """The last line, where the file does not end with a newline."""
        if self._size:
            yield self._take()

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._head:
            return
        self._parts.append(piece)
        if self._size > self._limit:
            self._head = b"".join(self._parts)[:HEAD]
            self._parts = []

    def _take(self) -> tuple[bytes | None, int, bytes]:
        size, head = self._size, self._head
        line = None if head else b"".join(self._parts)
        self._parts, self._size, self._head = [], 0, b""
        return line, size, head


_OUTSIDE = re.compile(rb'["{}\[\]:]')
_INSIDE = re.compile(rb'["\\]')
_KEY_BYTES = 64  # a top-level key longer than this is none of the ones looked for


class WithoutMember:
    """A JSON object read in chunks and kept, but for one top-level member's value, read past
    and kept as null. A finished inline batch (OpenRouter's GET /batches/{id}) holds every
    answer in `results`; a look at its status needs none of them, and they are read page by
    page from /results instead. Brackets and quotes are followed in and out of strings, so an
    answer's text cannot confuse it; everything else is left to the JSON parser."""

    def __init__(self, key: bytes) -> None:
        self._key = b'"' + key + b'"'
        self.kept: list[bytes] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string = bytearray()  # a top-level string so far (a key, or a short value)
        self._last = b""  # the last whole top-level string
        self._value = False  # the member being read is the one read past
        self._skip = 0  # the depth the read-past value started at; 0: keeping

    def feed(self, chunk: bytes) -> None:
        i, keep = 0, 0
        n = len(chunk)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                found = _INSIDE.search(chunk, i)
                j = n if found is None else found.start()
                self._note(chunk[i : j + 1 if j < n else n])
                if j == n:
                    break
                if chunk[j] == 0x5C:  # a backslash: the next byte is escaped
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 1 and not self._skip:
                        self._last = bytes(self._string)
                i = j + 1
                continue
            found = _OUTSIDE.search(chunk, i)
            if found is None:
                break
            j = found.start()
            c = chunk[j]
            if c == 0x22:  # "
                self._in_string = True
                self._string = bytearray(b'"')
            elif c in b"{[":
                if self._depth == 1 and self._value and not self._skip:
                    self.kept.append(chunk[keep:j])
                    self.kept.append(b"null")
                    self._skip = self._depth
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._skip and self._depth == self._skip:
                    self._skip = 0
                    keep = j + 1
            elif self._depth == 1:  # ':' after a top-level key
                self._value = self._last == self._key
            i = j + 1
        if not self._skip:
            self.kept.append(chunk[keep:] if keep else chunk)

    def _note(self, piece: bytes) -> None:
        if self._depth == 1 and not self._skip and len(self._string) <= _KEY_BYTES:
            self._string += piece[: _KEY_BYTES + 1]

    def joined(self) -> bytes:
        return b"".join(self.kept)
