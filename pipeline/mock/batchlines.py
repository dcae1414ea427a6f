"""A batch's lines in the mock: checked when the batch is made (what fails its validation, and
how each line will end), answered when it ends (its output and error lines, written to disk).

Both read the batch's input from disk a line at a time, in a worker thread (`asyncio.to_thread`
by the caller), so that a 100,000-line batch neither holds the loop nor sits in memory: what
is kept per line is one byte, how it will end.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.mock.answers import completion, job_key, text_of
from pipeline.mock.prefixcache import Served

# How a line will end, decided when the batch is made (one byte a line).
OK, FAULT, MARKED, NO_MESSAGES, UNKNOWN_MODEL = range(5)
FAIL_MARKER = "fail_me"  # a line whose content holds it always fails, with a 400: tests pick lines so
INVALID_MARKER = "invalid_me"  # a line whose content holds it fails its batch's validation, named
DISCOUNT = 0.5  # a batch's answers cost half the synchronous price
MAX_ERRORS = 100  # validation errors listed; past that a provider has said enough
_FAILURES = {
    FAULT: (500, "server_error", "mock batch fault 500"),
    MARKED: (400, "invalid_request_error", f"the content holds {FAIL_MARKER!r}"),
    NO_MESSAGES: (400, "invalid_request_error", "'messages' is required"),
    UNKNOWN_MODEL: (404, "model_not_found", "The model does not exist"),
}


@dataclass
class Checked:
    """What reading a batch's lines found."""

    lines: int = 0
    bytes: int = 0
    outcomes: bytearray = field(default_factory=bytearray)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None

    def error(self, code: str, message: str, *, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})

    def ok_among(self, done: int) -> int:
        """Lines answered 200 among the first `done`."""
        return self.outcomes.count(OK, 0, done)


def check_lines(
    path: Path,
    *,
    endpoint: str,
    model: str | None,
    max_lines: int,
    max_bytes: int,
    fail_rate: float,
    rng: random.Random,
    unknown_models: Collection[str],
    text_only: bool = False,
) -> Checked:
    """Read a batch's input (OpenAI batch lines) as a provider validates it. `model`: the
    batch's one model where the shape names it (inline); else the first line's is the batch's.
    `text_only`: a request with any other content part (an image...) fails the batch, as
    OpenRouter's batches are text-only."""
    checked = Checked(bytes=path.stat().st_size, model=model)
    if checked.bytes > max_bytes:
        checked.error(
            "file_too_large", f"The batch's input is {checked.bytes} bytes, more than the {max_bytes} allowed"
        )
        return checked
    seen: set[str] = set()
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            checked.lines += 1
            if checked.lines > max_lines:
                checked.error(
                    "too_many_requests_in_batch",
                    f"The batch holds more than the {max_lines} requests allowed",
                )
                break
            checked.outcomes.append(
                _check_line(checked, raw, number, endpoint, seen, fail_rate, rng, unknown_models, text_only)
            )
    return checked


def _check_line(
    checked: Checked,
    raw: bytes,
    number: int,
    endpoint: str,
    seen: set[str],
    fail_rate: float,
    rng: random.Random,
    unknown_models: Collection[str],
    text_only: bool,
) -> int:
    draw = rng.random()  # one draw a line, so that a line's fate does not hang on the others'
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        checked.error("invalid_json_line", "This line is not parseable as valid JSON.", line=number)
        return OK
    if not isinstance(line, dict):
        checked.error("invalid_json_line", "This line is not a JSON object.", line=number)
        return OK
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        checked.error("missing_required_parameter", "Missing 'custom_id'.", line=number, param="custom_id")
    elif custom_id in seen:
        checked.error(
            "duplicate_custom_id", f"The custom_id {custom_id!r} is on more than one line.", line=number
        )
    else:
        seen.add(custom_id)
    if line.get("method") != "POST":
        checked.error("invalid_method", "The method must be 'POST'.", line=number, param="method")
    if line.get("url") != endpoint:
        message = f"The url {line.get('url')!r} is not the batch's endpoint {endpoint!r}."
        checked.error("invalid_url", message, line=number, param="url")
    body = line.get("body")
    if not isinstance(body, dict):
        checked.error("missing_required_parameter", "Missing 'body'.", line=number, param="body")
        return OK
    model = body.get("model")
    if not isinstance(model, str) or not model:
        checked.error("missing_required_parameter", "Missing 'body.model'.", line=number, param="body.model")
    elif checked.model is None:
        checked.model = model
    elif model != checked.model:
        message = f"The model {model!r} is not the batch's {checked.model!r}: a batch holds one model."
        checked.error("mismatched_model", message, line=number, param="body.model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return NO_MESSAGES
    kinds = {p.get("type") for m in messages if isinstance(m, dict) for p in _parts(m) if isinstance(p, dict)}
    if text_only and kinds - {"text"}:
        message = f"The Batch API is text-only: this request carries {', '.join(sorted(map(str, kinds - {'text'})))}."
        checked.error("unsupported_content", message, line=number, param="body.messages")
    text = text_of(messages)
    if INVALID_MARKER in text:
        message = f"The request's content holds {INVALID_MARKER!r}, which this mock refuses."
        checked.error("invalid_request", message, line=number, param="body.messages")
    if model in unknown_models:
        return UNKNOWN_MODEL
    if FAIL_MARKER in text:
        return MARKED
    return FAULT if draw < fail_rate else OK


def _parts(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    return content if isinstance(content, list) else []


@dataclass
class Answered:
    """What answering a batch's lines did, for the mock's counters."""

    custom_ids: list[str] = field(default_factory=list)  # answered 200
    keys: list[str] = field(default_factory=list)  # their jobs (`answers.job_key`)
    failed: int = 0  # answered with an error status
    never_run: int = 0  # expired or cancelled before their turn
    usage: dict[str, float] = field(default_factory=dict)


def answer_lines(
    source: Path,
    outcomes: bytearray,
    done: int,
    *,
    out: IO[bytes],
    err: IO[bytes],
    name: str,
    stopped: str | None,
    inline: bool,
    cost: bool,
    chatty_when: str | None,
    uncached: bool,
) -> Answered:
    """Write the first `done` lines' answers (200s to `out`, failures to `err`) and the rest as
    never run (`stopped`: "batch_expired" or "batch_cancelled") to `err`."""
    answered = Answered(usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    index = 0
    with source.open("rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            line = orjson.loads(raw)
            custom_id, body = line["custom_id"], line["body"]
            row: dict[str, Any] = {"id": f"batch_req_{name}_{index}", "custom_id": custom_id}
            outcome = outcomes[index] if index < done else None
            index += 1
            if outcome is None:
                why = "expired" if stopped == "batch_expired" else "was cancelled"
                row |= {
                    "response": None,
                    "error": _never_run(
                        stopped or "batch_cancelled", f"The batch {why} before this request ran.", inline
                    ),
                }
                answered.never_run += 1
                err.write(orjson.dumps(row) + b"\n")
            elif outcome != OK:
                status, kind, message = _FAILURES[outcome]
                failure = {"error": {"message": message, "type": kind, "param": None, "code": None}}
                row |= {
                    "response": {
                        "status_code": status,
                        "request_id": f"req-{job_key(body)}",
                        "body": failure,
                    },
                    "error": None,
                }
                answered.failed += 1
                err.write(orjson.dumps(row) + b"\n")
            else:
                full = _answer(body, cost=cost, chatty_when=chatty_when, uncached=uncached)
                key = job_key(body)
                row |= {
                    "response": {"status_code": 200, "request_id": f"req-{key}", "body": full},
                    "error": None,
                }
                for name_, value in full["usage"].items():
                    if isinstance(value, int | float):
                        answered.usage[name_] = answered.usage.get(name_, 0) + value
                answered.custom_ids.append(custom_id)
                answered.keys.append(key)
                out.write(orjson.dumps(row) + b"\n")
    if "cost" in answered.usage:
        answered.usage["cost"] = round(answered.usage["cost"], 10)
    return answered


def _never_run(code: str, message: str, inline: bool) -> dict[str, Any]:
    # OpenAI's error file says `code`; OpenRouter's results say `type` (with `param`).
    return {"message": message, "type": code, "param": None} if inline else {"code": code, "message": message}


def _answer(body: dict[str, Any], *, cost: bool, chatty_when: str | None, uncached: bool) -> dict[str, Any]:
    """The synchronous mock's answer, at the batch price; `uncached`: the mock keeps a prompt
    cache, which its batches do not use, so a line says none of its prompt was cached (where,
    without one, one answer in four says half, as the synchronous mock's do)."""
    full = completion(body, cost=cost, cache=Served(0, 0) if uncached else None)
    if chatty_when and chatty_when in text_of(body["messages"]):
        full["choices"][0]["message"]["content"] = "Sure! Here is my verdict: it looks fine to me."
    usage = full["usage"]
    if "cost" in usage:
        usage["cost"] = round(usage["cost"] * DISCOUNT, 10)
    return full
