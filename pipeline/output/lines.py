"""The lines of the output files, as bytes: a result (the OpenAI Batch output shape), an
error, the key a failure is listed under, and the API key kept out of all of them."""

from __future__ import annotations

import os
from typing import Any

import orjson

from pipeline.input import jsonl
from pipeline.job import Failure, Success


def result_line(success: Success, line_id: str | None = None) -> bytes:
    """`line_id`: the random part of the line's own id (24 hex digits), else drawn here."""
    reply = success.reply
    # The body's own bytes are copied in as they came; parsed and re-encoded only when they
    # span lines or the line must go through the slow, lossless encoder (see `jsonl`).
    body: Any = orjson.Fragment(reply.raw) if reply.raw is not None else reply.body
    line: dict[str, Any] = {
        "id": "batch_req_" + (line_id or os.urandom(12).hex()),
        "custom_id": success.request.custom_id,
        "response": {"status_code": reply.status, "request_id": reply.request_id, "body": body},
        "error": None,
    }
    if success.reused:
        line["reused"] = True  # taken from the answer cache, or shared in flight: not paid again
        if success.bought is not None:  # (the cache's: what it cost when bought, for a repair too)
            line["cost_not_spent"] = success.bought
    if success.parsed is not None:
        line["parsed"] = success.parsed
    if success.request.metadata is not None:
        line["metadata"] = success.request.metadata
    try:
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)  # (no copy to add it)
    except TypeError:
        line["response"]["body"] = reply.body
        return jsonl.dumps(line) + b"\n"


def error_line(failure: Failure) -> bytes:
    error: dict[str, Any] = {"code": failure.code, "message": failure.message, **failure.extra}
    response = None
    if failure.status is not None or failure.body is not None:
        response = {"status_code": failure.status, "request_id": failure.request_id, "body": failure.body}
    line: dict[str, Any] = {
        "id": None,
        "custom_id": failure.custom_id,
        "response": response,
        "error": error,
        "line": failure.line,
        "attempts": failure.attempts,
    }
    if failure.metadata is not None:
        line["metadata"] = failure.metadata
    return jsonl.dumps(line, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def failure_key(failure: Failure) -> str:
    # Input errors are keyed by line: the same id may be bad twice (a duplicate), and a
    # fixed line must stop being listed even if its id changed.
    if failure.is_input_error or failure.custom_id is None:
        return f"line:{failure.line}"
    return failure.custom_id


class Redactor:
    """Removes the API key from anything written out, should a server ever echo it."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret.encode() if secret and len(secret) >= 6 else None

    def __call__(self, data: bytes) -> bytes:
        if self._secret is not None and self._secret in data:
            return data.replace(self._secret, b"[REDACTED]")
        return data

    def text(self, text: str) -> str:
        return self(text.encode()).decode()
