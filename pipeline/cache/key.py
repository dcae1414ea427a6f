"""The key an answer is kept under: a SHA-256 over the request as it is sent, in a canonical
form, so that two requests share a key when, and only when, the model is asked the same thing.

What is hashed: the payload (`Request.payload`, after `Attempts.fill` has put local images in
as data URLs, so an image counts by its bytes as sent: resized, re-encoded), parsed and written
again with its object keys sorted (key order says nothing to the model; array order does:
messages, content parts, stop strings), and a `scope` the caller names (the endpoint: a cache
filled against a mock or one provider is then not served to another that names a model the
same). Every parameter counts, unknown ones too (one may change the answer), except these,
which change how an answer is carried or recorded, never what it says:

    stream, stream_options     an answer streamed is assembled into the body an unstreamed
                               one has (`pipeline.send.sse`): the two share it
    metadata, store            OpenAI's stored-completions tags and whether to keep it (a
                               bare-body line's own `metadata` rides there: lines alike but
                               for their tags must share an answer)
    user, safety_identifier    who the end user is, for the provider's abuse monitoring
    service_tier               how fast and at what price, from the same model
    prompt_cache_key,          hints for the provider's prompt cache (issue 23, point 3):
    cache_control              turning `prompt_cache` on keeps the answers; `cache_control`
                               is dropped from messages, their content parts and tools only
                               (elsewhere, a JSON schema's property may bear the name)

and a message's content that is one text part alone counts as that text (the same prompt to
the model, and how `prompt_cache` marks a string content: a list of one marked part).

A number is kept as written after parsing: `temperature: 1` and `1.0` are two keys (a miss,
never a wrong answer). An integer beyond 64 bits, which orjson reads as a float (two such
integers a float apart would then share a key), sends the payload the standard library's
lossless way: found by a walk over the parsed containers, not a search of every byte
(`jsonl.has_long_number` would double the cost of a 100 kB key).

Cost, measured on one core of a shared 2-core machine: 3 to 5 µs a key for a 1 kB payload,
100 to 140 µs for 100 kB (an inlined image): parsing, writing sorted, hashing; the hash is
about 1 µs a kilobyte (SHA-256, faster here than BLAKE2b: CPUs have SHA instructions).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

_VERSION = b"pipeline answer key 1\0"  # a new canonical form gets a new prefix: old keys then miss
_CARRIAGE = (
    "stream",
    "stream_options",
    "metadata",
    "store",
    "user",
    "safety_identifier",
    "service_tier",
    "prompt_cache_key",
)
_MARKER = b'"cache_control"'
_BIG = float(2**63)  # a float this big in a request was most likely an integer orjson could not hold


def request_key(payload: bytes, *, scope: str = "") -> bytes:
    """The 32-byte key of the request `payload` (as sent) to the endpoint `scope`. Raises
    ValueError when the payload is not a JSON object (it always is, made by the reader)."""
    try:
        body, slow = orjson.loads(payload), False
        if isinstance(body, dict) and _has_big_float(body):
            raise ValueError("an integer orjson may have read as a float")
    except ValueError:  # (orjson's errors are ValueErrors)
        body, slow = json.loads(payload), True  # the lossless way: integers kept exact
    if not isinstance(body, dict):
        raise ValueError("a request payload is a JSON object")
    for name in _CARRIAGE:
        if name in body:
            del body[name]
    if _MARKER in payload:
        _drop_cache_control(body)
    _one_part_as_text(body)
    canonical = b""
    if not slow:
        try:
            canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # (orjson writes 255 levels at most, where it reads 1,024)
            slow = True
    if slow:
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )
    digest = hashlib.sha256(_VERSION)
    digest.update(scope.encode())
    digest.update(b"\0")
    digest.update(canonical)
    return digest.digest()


def _has_big_float(body: dict[str, Any]) -> bool:
    """Whether a float of 2**63 or more sits anywhere in `body` (strings, which hold the
    bulk of a payload's bytes, are not looked into: a walk over its few containers)."""
    stack: list[Any] = [body]
    while stack:
        node = stack.pop()
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append(child)
            elif kind is float and (child >= _BIG or child <= -_BIG):
                return True
    return False


def _one_part_as_text(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    for message in messages if type(messages) is list else ():
        content = message.get("content") if type(message) is dict else None
        if type(content) is list and len(content) == 1:
            part = content[0]
            if type(part) is dict and len(part) == 2 and part.get("type") == "text":
                text = part.get("text")
                if type(text) is str:
                    message["content"] = text


def _drop_cache_control(body: dict[str, Any]) -> None:
    for name in ("messages", "tools"):
        items = body.get(name)
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            item.pop("cache_control", None)
            parts = item.get("content")
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict):
                        part.pop("cache_control", None)
