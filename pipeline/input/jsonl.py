"""JSON in and out, fast (orjson) and lossless (the standard library where orjson is not).

orjson reads an integer beyond 64 bits as a float, silently changing a user's parameter, and
refuses to write one. Such numbers are rare, so lines that may hold one (a run of 20 digits)
go through the standard library instead, and so does writing what orjson refuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"\d{20}")


def parse(raw: bytes) -> tuple[Any, bool]:
    """One JSON document, and whether it went the slow way (the standard library, which also
    lets through what orjson refuses, such as a lone surrogate escape). Raises ValueError
    (orjson's or json's) when it is not JSON."""
    if _LONG_NUMBER.search(raw) is None:
        return orjson.loads(raw), False
    return json.loads(raw), True


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
