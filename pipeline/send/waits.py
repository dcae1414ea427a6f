"""What a server says about waiting: how long to wait (Retry-After, a reset, a refusal's
message) and how fast it allows (a stated limit). The one place such words become numbers,
made sane on the way, so that nothing after has to doubt them:

- a wait is a finite number of seconds from 0 to a day (`DAY`), or None: not said, or said so
  that no wait can be read from it (then the retry policy's own backoff decides);
- a stated limit is a count a minute, at least one and under a billion, or None (ignored: a
  billion or more is a gateway's way of saying "unlimited").

What gateways send, and what it is taken to mean:

    Retry-After: 3, 0.5              seconds (RFC 9110; a fraction is read too)
    Retry-After: <an HTTP date>      until then; a date past: 0, its moment has come
    retry-after-ms: 250              milliseconds (OpenAI, Azure)
    a number within a year of now,   a moment (epoch seconds or milliseconds), in any of these
      as seconds or milliseconds     headers: some gateways send their reset time so; until then
    more than a day                  a day: it asks for long, and the give-up rule decides
    negative, nan, inf, 1e400,       None: no wait can be read from it
      empty, words
    "5, 7", two headers              several values (a proxy joins repeated headers with commas):
                                     the longest that reads, as every hop asked for at least that
    x-ratelimit-reset-*: 6m0s, 20ms  durations as OpenAI writes them, or numbers as above
    "Please try again in 71ms."      in a 429's message (OpenAI's words; "retry in 37.6s" is
                                     Gemini's), when no header says
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping

DAY = 86_400.0  # seconds: the longest wait a server can ask for
YEAR = 365 * DAY  # a number this close to now is a moment, not a number of seconds
# A limit a minute this high is a way of saying none (2**31 - 1, 2**63 - 1: a gateway's
# "unlimited"); the highest any provider states is far lower (OpenAI's: 150 million tokens).
UNLIMITED = 1e9
# Patterns (without case: (?i)) that `re` compiles where first used, and keeps: compiled
# here, they cost every run 4.8 million instructions (callgrind), and most runs never read
# a duration in words.
_UNITS = r"(?:milliseconds?|ms|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)"
_PART = rf"(?i)(\d+(?:\.\d+)?)\s*({_UNITS})"
_DURATION = rf"(?i)(?:\d+(?:\.\d+)?\s*{_UNITS}\s*)+"
_TRY_AGAIN = rf"(?i)(?:try again|retry)(?: in| after)?\s+((?:\d+(?:\.\d+)?\s*{_UNITS}\s*)+)"


def sane(seconds: float | None) -> float | None:
    """A wait as the rest of the run may take it: finite, from 0 to a day; else None."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, DAY) + 0.0  # (+ 0.0: never -0.0)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _seconds(value: float, unit: float, now: float) -> float | None:
    """A number said in `unit` seconds: a wait, or a moment when it lands near now."""
    for scale in (1.0, 0.001):  # epoch seconds, epoch milliseconds
        moment = value * scale
        if abs(moment - now) <= YEAR:
            return sane(max(moment - now, 0.0))
    return sane(value * unit)


def _date(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": UTC, as RFC 5322 means it
            when = when.replace(tzinfo=dt.UTC)
        return sane(max(when.timestamp() - now, 0.0))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _duration(text: str) -> float | None:
    """ "6m0s", "20ms", "1h2m3.5s", "2 seconds": the sum of its parts."""
    if not re.fullmatch(_DURATION, text):
        return None
    total = 0.0
    for number, unit in re.findall(_PART, text):
        unit = unit.lower()
        scale = (
            0.001
            if unit.startswith(("ms", "milli"))
            else 3600.0
            if unit.startswith("h")
            else 60.0
            if unit.startswith("m")
            else 1.0
        )
        total += float(number) * scale
    return total


def _longest(value: str | None, read: Callable[[str], float | None]) -> float | None:
    """What one header says, read whole, else as values joined by commas: the longest."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    whole = read(value)  # (an HTTP date holds a comma of its own)
    if "," not in value:
        return whole
    waits = [w for part in value.split(",") if (w := read(part.strip())) is not None]
    return max([*waits, whole] if whole is not None else waits, default=None)


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header: aiohttp keeps repeated ones apart (`getall`)."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]


def _header(headers: Mapping[str, str], name: str, read: Callable[[str], float | None]) -> float | None:
    waits = [w for value in _values(headers, name) if (w := _longest(value, read)) is not None]
    return max(waits, default=None)


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms`, else `Retry-After`."""
    now = time.time() if now is None else now

    def ms(text: str) -> float | None:
        number = _number(text)
        return None if number is None else _seconds(number, 0.001, now)

    def seconds(text: str) -> float | None:
        number = _number(text)
        return _date(text, now) if number is None else _seconds(number, 1.0, now)

    wait = _header(headers, "retry-after-ms", ms)
    return wait if wait is not None else _header(headers, "retry-after", seconds)


def parse_duration(value: str | None, *, now: float | None = None) -> float | None:
    """A reset time as servers write it (x-ratelimit-reset-*): "1s", "6m0s", "20ms", a plain
    number of seconds, or a moment (epoch seconds or milliseconds)."""
    now = time.time() if now is None else now

    def read(text: str) -> float | None:
        number = _number(text)
        return sane(_duration(text)) if number is None else _seconds(number, 1.0, now)

    return _longest(value, read)


def said_wait(message: str) -> float | None:
    """Seconds an error message asks to wait ("Please try again in 71ms"), if it says."""
    found = re.search(_TRY_AGAIN, message)
    return sane(_duration(found.group(1).strip())) if found else None


def per_minute(value: str | None) -> float | None:
    """A limit a server states (x-ratelimit-limit-*, a count a minute): at least one and at
    most `UNLIMITED`, else None; of several joined by commas, the tightest."""
    if value is None:
        return None
    counts = [
        n for part in value.split(",") if (n := _number(part.strip())) is not None and 1 <= n < UNLIMITED
    ]
    return min(counts, default=None)


def spent(value: str | None) -> bool:
    """Whether x-ratelimit-remaining-* says nothing is left (0, or less)."""
    if value is None:
        return False
    return any((n := _number(part.strip())) is not None and n <= 0 for part in value.split(","))
