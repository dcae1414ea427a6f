"""The usual line read in one pass: a bare request body or an OpenAI Batch line whose messages
are plain text, checked, looked over for what orjson cannot read, and measured for the token
estimate in a single walk over the parsed value.

`pipeline.input.line` reads any line in four passes (JSON with a scan of the bytes for long
integers, the body's checks, the token estimate's walk over the messages, the request built),
some 63,000 instructions a line of 300 bytes, where the bare aiohttp loop spends 11,000. Most
lines are of the usual shape, and for them one walk learns what the four passes need. What
the walk does not know for sure (another shape, a field of an odd type or null, a message
with more than a role and its text, deep nesting, JSON orjson refuses) it leaves to `line`,
which reads the line whole as it always did: every error message comes from there. A
property (tests/test_properties_input.py) holds the two readings equal on any line.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipeline.input.body import FIELD_TYPES
from pipeline.input.jsonl import has_long_number
from pipeline.input.tokens import BODY_TEXT, PER_MESSAGE, PER_REPLY, Pieces

BATCH_URL = "/v1/chat/completions"
_DEEPEST = 8  # levels a parameter may nest for this walk (far under jsonl.MAX_DEPTH)
_PLAIN = frozenset((str, int, bool, type(None)))
_MESSAGES = frozenset((list,))  # (a rule of its own, known by identity)
# What the walk asks of a field by its name, where it asks more than a plain value, a float,
# or an array or object holding those: the type a checked field must have (null is left to
# `line`); the text the estimate encodes (tools...) is left to `line` (no type is allowed).
_RULES: dict[str, frozenset[type]] = {
    **FIELD_TYPES,
    "messages": _MESSAGES,
    **dict.fromkeys(BODY_TEXT, frozenset()),
}
# The plain types a field passes with at one look: any, but where a rule says which.
_AT_ONCE = {key: rule & _PLAIN for key, rule in _RULES.items()}


def _floats(value: Any, depth: int) -> bool | None:
    """Whether `value` (an array or object) holds a float, which may stand for an integer
    orjson could not hold; None where it nests deeper than this walk looks."""
    if depth > _DEEPEST:
        return None
    found = False
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is float:
            found = True
        elif kind is dict or kind is list:
            inner = _floats(item, depth + 1)
            if inner is None:
                return None
            found = found or inner
        else:
            return None
    return found


def _body(body: dict[str, Any]) -> tuple[bool, Pieces] | None:
    """A body's checks and its token estimate's pieces (see `tokens._pieces`) in one walk:
    whether it holds a float, the fixed tokens and the texts; None where `line` must look."""
    floats = False
    pieces: Pieces | None = None
    for key, value in body.items():
        kind = type(value)
        if kind in _AT_ONCE.get(key, _PLAIN):
            continue  # (most fields: one look)
        rule = _RULES.get(key)
        if rule is _MESSAGES:
            if kind is not list or not value:
                return None
            texts = []
            for message in value:
                if type(message) is not dict or len(message) != 2:
                    return None
                content = message.get("content")
                if type(content) is not str or type(message.get("role")) is not str:
                    return None
                texts.append(content)
            pieces = (PER_REPLY + PER_MESSAGE * len(value), texts)
            continue
        if rule is not None and kind not in rule:
            return None
        if kind is float:
            floats = True
        elif kind is dict or kind is list:
            inner = _floats(value, 1)
            if inner is None:
                return None
            floats = floats or inner
        else:
            return None
    return None if pieces is None else (floats, pieces)


Usual = tuple[dict[str, Any], Any, Any, Pieces]


def read_usual(raw: bytes) -> tuple[Usual | None, Any]:
    """The line's body, its custom_id (as the line wrote it: a non-empty string, a whole
    number or None), its metadata and the token estimate's pieces, where the line is of the
    usual shape. Else None, and orjson's value of the line as it read it (None where it read
    none), for `line` to read whole without parsing it again: a line with an image part of a
    megabyte was parsed twice, 1.6 ms a line where 2.0. (One function: every line comes here.)"""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if type(obj) is not dict:
        return None, obj
    if "body" in obj and ("url" in obj or "method" in obj or "custom_id" in obj):
        body = obj["body"]
        if type(body) is not dict or obj.get("url") != BATCH_URL or obj.get("method", "POST") != "POST":
            return None, obj
        read = _body(body)
        if read is None:
            return None, obj
        rest = _floats({key: value for key, value in obj.items() if key != "body"}, 1)
        if rest is None:
            return None, obj
        floats, pieces = read[0] or rest, read[1]
    else:
        read = _body(obj)
        if read is None:
            return None, obj
        floats, pieces = read
        body = obj
    custom_id = obj.get("custom_id")
    kind = type(custom_id)
    if not ((kind is str and custom_id) or kind is int or custom_id is None):
        return None, obj
    # orjson reads an integer past 64 bits as a float: only a line with a float can hold one
    # (`line` scans every line it reads for them, and parses this one again).
    if floats and has_long_number(raw):
        return None, obj
    if body is obj:
        obj.pop("custom_id", None)  # (a bare body names its id beside its fields: not sent)
    return (body, custom_id, obj.get("metadata"), pieces), None
