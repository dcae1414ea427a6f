"""Whatever a server says about waiting, the run waits a finite time between 0 and a day, or
its own backoff; and whatever it states as its limits, the pace stays a finite, positive rate.

Header values come from Hypothesis: numbers of every size and sign (nan, inf, 1e400, epoch
times in seconds and milliseconds near now), HTTP dates from year 1 to 9999 and mangled ones,
durations ("6m0s"), words, and several of these joined by commas as proxies join repeated
headers. Error bodies are JSON (messages saying "try again in ..." in several ways, deep,
not text) or not. They go through what the client does with a failed answer (`error_for`)
and through what the pace does with it (the rate finder's `headers` and `pushback`).
"""

from __future__ import annotations

import email.utils
import math

from hypothesis import event, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from pipeline.errors import RunStopped
from pipeline.pace.finder import RateFinder
from pipeline.pace.pacer import Pacer
from pipeline.pace.stated import MAX_PAUSE
from pipeline.pace.window import Window
from pipeline.send.client import RATE_HEADERS, error_for, rate_headers
from pipeline.send.waits import DAY, parse_duration, retry_after, said_wait
from tests.strategies import deep, dumps, runs_stack

NOW = 1_750_000_000.0  # the wall clock, in epoch seconds, for every example

# -- what a header may say ----------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda f: f"{f:.3f}"),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=300, max_value=400).map(lambda digits: "9" * digits),  # inf as a float
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "+inf",
            "Infinity",
            "1e400",
            "-1e400",
            "-0",
            "0",
            " 5 ",
            "1_000",
            "0x10",
            "1e-400",
        ]
    ),
)
# A moment near now, as a timestamp in seconds or milliseconds (some gateways' reset time).
MOMENTS = st.tuples(
    st.floats(min_value=-3 * DAY, max_value=400 * DAY), st.sampled_from([1, 1000]), st.booleans()
).map(lambda t: str(int((NOW + t[0]) * t[1])) if t[2] else repr((NOW + t[0]) * t[1]))
DATES = st.one_of(
    st.floats(min_value=-62e9, max_value=253e9).map(lambda t: email.utils.formatdate(t, usegmt=True)),
    st.floats(min_value=NOW - 3 * DAY, max_value=NOW + 3 * DAY).map(lambda t: email.utils.formatdate(t)),
    st.sampled_from(
        [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Mon, 01 Jan 0000 00:00:00 GMT",
            "Mon, 99 Jan 2020 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Sun, 06 Nov 1994 08:49:37 -0000",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "1 Jan 2020 00:00:00 +9999",
        ]
    ),
)
UNITS = st.sampled_from(
    [
        "ms",
        "s",
        "m",
        "h",
        "S",
        "MS",
        " seconds",
        " second",
        " minutes",
        " min",
        " hours",
        "milliseconds",
        "x",
        "",
    ]
)
DURATIONS = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["0.5", "1.5", "9" * 400, "1e5"])), UNITS
    ),
    min_size=1,
    max_size=4,
).map(lambda parts: "".join(n + u for n, u in parts))
ONE = st.one_of(NUMBERS, MOMENTS, DATES, DURATIONS, st.text(max_size=30))
VALUE = st.one_of(
    ONE,
    st.lists(ONE, min_size=2, max_size=4).map(", ".join),
    st.lists(ONE, min_size=2, max_size=3).map(",".join),
)
NAMES = ("retry-after", "retry-after-ms", *RATE_HEADERS)


@st.composite
def headers(draw: st.DrawFn) -> CIMultiDict[str]:
    """A response's headers, as aiohttp gives them: case-insensitive, repeats kept apart."""
    found: CIMultiDict[str] = CIMultiDict()
    for name, value in draw(st.lists(st.tuples(st.sampled_from(NAMES), VALUE), max_size=6)):
        found.add(draw(st.sampled_from([name, name.title(), name.upper()])), value)
    return found


# -- what an error body may say -------------------------------------------------------------------

TRY_AGAIN = st.tuples(
    st.sampled_from(
        [
            "Please try again in ",
            "try again in ",
            "Try again in",
            "Please retry in ",
            "retry after ",
            "TRY AGAIN IN ",
        ]
    ),
    st.one_of(DURATIONS, NUMBERS, st.text(max_size=10)),
    st.sampled_from(
        [".", "", ". Visit https://platform.openai.com/account/rate-limits", " (limit 3, used 3)"]
    ),
).map("".join)
MESSAGE = st.one_of(
    TRY_AGAIN,
    st.text(max_size=50),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=20), TRY_AGAIN, st.text(max_size=20)),
)


JSON_ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
ODD = st.one_of(JSON_ANY, st.builds(deep, st.sampled_from([300, 900, 1000, 1023])))
BODY = st.one_of(
    st.builds(
        lambda m, c, t: {"error": {"message": m, "code": c, "type": t}},
        st.one_of(MESSAGE, ODD),
        st.one_of(st.just(429), ODD),
        ODD,
    ),
    st.builds(lambda m: {"error": m}, st.one_of(MESSAGE, ODD)),
    st.builds(lambda m: {"message": m}, st.one_of(MESSAGE, ODD)),
    st.builds(lambda m: {"detail": m}, st.one_of(MESSAGE, ODD)),
    ODD,
).map(dumps)
RAW = st.one_of(BODY, MESSAGE.map(str.encode), st.binary(max_size=100), st.just(b"[" * 1100 + b"]" * 1100))


def sane_wait(wait: float | None) -> None:
    if wait is None:
        event("no wait")
        return
    event("a wait of a day" if wait == DAY else "a wait of 0" if wait == 0 else "a wait")
    assert isinstance(wait, float)
    assert math.isfinite(wait)
    assert 0.0 <= wait <= DAY


@given(headers())
@runs_stack
def test_any_header_values_give_a_wait_from_0_to_a_day_or_none(found: CIMultiDict[str]) -> None:
    sane_wait(retry_after(found, now=NOW))
    for kind in ("requests", "tokens"):
        sane_wait(parse_duration(found.get(f"x-ratelimit-reset-{kind}"), now=NOW))


@given(MESSAGE)
@runs_stack
def test_any_message_gives_a_wait_from_0_to_a_day_or_none(message: str) -> None:
    sane_wait(said_wait(message))


# -- the pace, fed what a refusal says ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WatchedPacer(Pacer):
    """A pacer on the finder's clock, which checks every rate and pause it is given."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pauses: list[float] = []
        super().__init__()

    def _now(self) -> float:
        return self.clock.now

    def set_rates(self, *, request_rate: float | None, token_rate: float | None) -> None:
        for rate in (request_rate, token_rate):
            assert rate is None or (math.isfinite(rate) and rate > 0), rate
        super().set_rates(request_rate=request_rate, token_rate=token_rate)

    def pause(self, seconds: float) -> None:
        assert math.isfinite(seconds), seconds
        assert 0 <= seconds <= MAX_PAUSE, seconds
        self.pauses.append(seconds)
        super().pause(seconds)


@given(st.lists(st.tuples(st.sampled_from([429, 503, 500]), headers(), RAW), min_size=1, max_size=8))
@runs_stack
def test_any_refusals_keep_the_pace_finite_and_positive(
    refusals: list[tuple[int, CIMultiDict[str], bytes]],
) -> None:
    clock = Clock()
    pacer = WatchedPacer(clock)
    stops: list[RunStopped] = []
    finder = RateFinder(pacer, Window(64), clock=clock, give_up=30.0, stop=stops.append)
    tickets = [finder.sent() for _ in refusals]  # sent together, refused in a row
    for ticket, (status, found, raw) in zip(tickets, refusals, strict=True):
        clock.now += 0.01
        error = error_for(status, found, raw, limits=rate_headers(found))
        sane_wait(error.retry_after)
        assert isinstance(error.message, str)
        assert len(error.message) < 400
        # as the gate passes a failed attempt on (pipeline.pace.gate.Slot.failed)
        if error.limits:
            finder.headers(error.limits)
        if error.refusal or status == 503:
            finder.pushback(ticket, error.retry_after, error.message)
        else:
            finder.failure(ticket)
        finder.headers(found)  # and an answer's headers, as a success brings them
    for stop in stops:
        event("the run stopped")
        assert "refuses every request" in str(stop)
