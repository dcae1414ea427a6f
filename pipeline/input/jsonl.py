"""JSON in and out, fast (orjson) and lossless (the standard library where orjson is not).

orjson reads an integer beyond 64 bits as a float, silently changing a user's parameter, and
refuses to write one. Such numbers are rare, so lines that may hold one (a run of 20 digits,
or of 19 after a minus: below -2**63) go through the standard library instead, and so does
writing what orjson refuses.

Either way a line reads the same: the standard library is made to refuse what orjson
refuses (NaN, Infinity, a number too big for a float), and neither accepts a document
nested deeper than `MAX_DEPTH`, so that whatever is read can be written again, inside the
line of results.jsonl it ends in, by orjson (254 levels at most) or the standard library
(which recurses, and would run out of stack a few hundred levels further).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson

from pipeline.errors import InputError

_RUN = b"0" * 19  # (looked for first: where there is none, as in most lines, one search tells)
_LONG_NUMBER = b"0" * 20
_LONG_NEGATIVE = b"-" + _RUN  # (-9223372036854775809 has 19 digits, and is past 64 bits)
# Every digit as "0", a minus as itself, every other byte as " ": a run of 20 digits is then a
# plain substring, found in a tenth of the time the regular expression \d{20} took (2.6 us a
# line of 300 bytes, a search tried at every byte).
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else i if i == 0x2D else 0x20 for i in range(256))
_SLICE = 1 << 16  # bytes mapped at a time, so that a big line (images) is not copied whole
# Far above what any provider accepts (OpenAI's structured outputs: 10 levels), far under
# what orjson and the standard library can write.
MAX_DEPTH = 200


class TooDeep(ValueError):
    def __init__(self) -> None:
        super().__init__(f"nested more than {MAX_DEPTH} levels deep")


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits() > 0:
        raise ValueError(f"a number of {digits:,} digits (the most is {sys.get_int_max_str_digits():,})")
    return int(text)


def _deeper(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (without recursion: it is to guard
    against recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def has_long_number(raw: bytes) -> bool:
    """Whether `raw` holds a run of 20 digits, or a minus and 19 (an integer orjson may read
    as a float)."""
    if len(raw) <= _SLICE:
        mapped = raw.translate(_DIGITS)
        return _RUN in mapped and (_LONG_NUMBER in mapped or _LONG_NEGATIVE in mapped)
    view = memoryview(raw)
    # Slices overlap by 19 bytes, so that no run is cut in two.
    for start in range(0, len(raw), _SLICE):
        mapped = bytes(view[start : start + _SLICE + 19]).translate(_DIGITS)
        if _RUN in mapped and (_LONG_NUMBER in mapped or _LONG_NEGATIVE in mapped):
            return True
    return False


def parse(raw: bytes, read: Any = None) -> tuple[Any, bool]:
    """One JSON document, and whether it went the slow way (the standard library, which also
    lets through what orjson refuses, such as a lone surrogate escape). Raises ValueError
    (orjson's, json's, or `TooDeep`) when it is not JSON, or nested too deep to write again.
    `read`: orjson's value of `raw` where it was read already (not None), taken unless `raw`
    holds an integer orjson cannot."""
    try:
        if not has_long_number(raw):
            value, slow = orjson.loads(raw) if read is None else read, False
        else:
            value = json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
            slow = True
    except RecursionError:
        raise TooDeep() from None
    except orjson.JSONDecodeError as e:
        if e.msg.startswith("depth limit exceeded"):
            raise TooDeep() from None
        raise
    if too_deep(raw, value):
        raise TooDeep()
    return value, slow


def too_deep(raw: bytes, value: Any) -> bool:
    """Whether `value`, read from `raw`, nests more than `MAX_DEPTH` levels. Only a text with
    that many brackets can nest that deep: most are never walked. And only a text of twice
    that many bytes holds them and their closing brackets: a short one is not even counted
    (a count looks at every byte, twice: some 4,000 instructions for a line of 300 bytes)."""
    many = len(raw) > 2 * MAX_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    return many and isinstance(value, dict | list) and _deeper(value, MAX_DEPTH)


def _encodable(value: Any) -> Any:
    """The standard library reads a lone surrogate escape ("\\ud800") that no UTF-8 can hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InputError(
            "the line holds a lone surrogate escape (such as \\ud800), which is not text; fix the text",
            code="not_utf8",
        ) from None
    return value


def load_line(raw: bytes, read: Any = None) -> Any:
    """An input line's JSON value, or the `InputError` that says what is wrong with it (`read`:
    orjson's value of it, where read already)."""
    try:
        value, slow = parse(raw, read)
        return _encodable(value) if slow else value
    except TooDeep as e:
        raise InputError(f"the line is {e}; flatten it", code="too_deep") from None
    except ValueError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            raise InputError(
                f"bytes at column {u.start + 1} are not UTF-8; save the file as UTF-8",
                code="not_utf8",
            ) from None
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise InputError(f"not valid JSON: {detail}", code="not_json") from None


def loads(raw: bytes) -> Any:
    """Parse one JSON document; raises ValueError (orjson's or json's) when it is not JSON."""
    return parse(raw)[0]


def dumps(obj: Any, *, option: int = 0) -> bytes:
    try:
        return orjson.dumps(obj, option=option)
    except TypeError:
        indent = 2 if option & orjson.OPT_INDENT_2 else None
        separators = None if indent else (",", ":")
        return json.dumps(obj, ensure_ascii=False, indent=indent, separators=separators, default=str).encode()
