"""What the properties (tests/test_properties_*.py) share: JSON text as careless writers write
it (NaN and Infinity literals, lone surrogates escaped or raw, then not UTF-8), values nested
as deep as wanted, deeper than `json.dumps` itself can go (about a thousand levels), to reach
parsers' limits; and strategies that are mostly well formed, odd now and then."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import strategies as st

_DEEP = re.compile(rb'"@deep:(\d+):(list|dict)@"')
RUN_RECURSION_LIMIT = 1000  # Python's, which a run keeps
F = TypeVar("F", bound=Callable[..., Any])


def runs_stack(test: F) -> F:
    """Run a property's body under the recursion limit a run has (put it under `@given`).
    Hypothesis raises the limit by about two thousand frames while a test runs, for its own
    machinery: under it, a value nested a thousand deep that ends a run with RecursionError
    (str() of a 404's error code) passes. (The test's own frames are a few dozen more than a
    worker's: the property is a little stricter than a run, never looser.)"""

    @functools.wraps(test)
    def under_the_runs_limit(*args: Any, **kwargs: Any) -> Any:
        raised = sys.getrecursionlimit()
        sys.setrecursionlimit(RUN_RECURSION_LIMIT)
        try:
            return test(*args, **kwargs)
        finally:
            sys.setrecursionlimit(raised)

    return under_the_runs_limit  # type: ignore[return-value]


def deep(depth: int, kind: str = "list") -> str:
    """A value nested `depth` levels: a token that `dumps` writes out as such."""
    return f"@deep:{depth}:{kind}@"


def _nested(match: re.Match[bytes]) -> bytes:
    depth = int(match.group(1))
    if match.group(2) == b"list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def dumps(value: Any, *, ascii_only: bool = True, nan: bool = True) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=nan).encode("utf-8", "surrogatepass")
    return _DEEP.sub(_nested, text)


def sometimes(
    odd: st.SearchStrategy[Any], usual: st.SearchStrategy[Any], *, one_in: int = 8
) -> st.SearchStrategy[Any]:
    """Mostly `usual`, now and then `odd`: what comes from outside is odd in one place at a
    time, mostly, or every example would fail at its first field and the rest never be read.
    (Not `one_of` with `usual` repeated: Hypothesis draws its distinct branches evenly.)"""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda rare: odd if rare else usual)
