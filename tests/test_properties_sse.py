"""Whatever bytes a stream brings, the client makes of them one chat completion, or an error
of `pipeline.errors` (a MalformedResponse, a ProviderError): never another exception.

Streams come from Hypothesis: events of chunks of every shape (indexes that are strings or
huge, deltas that are not objects, tool calls and logprobs of odd kinds, error chunks,
finish reasons), data that is not JSON (NaN, invalid UTF-8, surrogate escapes, nesting a
thousand deep), comments and other fields, CRLF, [DONE] or not, any bytes at all; cut into
pieces at random, as a network delivers them, and read the way the client reads them (an
aiohttp StreamReader, as it arrives, into `sse.assemble`). A completion must also be one
the run can keep: its tokens read and its line of results.jsonl written.

An answer not streamed likewise: any JSON body of a 200 is a completion the run keeps, or an
error of `pipeline.errors` whose usage, when it reports any, the books count (a body thrown
away may hold anything: counting it took len() of its choices, and `"choices": true` ended
the run).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp.base_protocol import BaseProtocol
from hypothesis import event, given
from hypothesis import strategies as st

from pipeline.account.books import Books
from pipeline.account.usage import Usage, answer_tokens
from pipeline.errors import RequestError
from pipeline.input.jsonl import too_deep
from pipeline.job import Failure, Reply, Request, Success
from pipeline.output.lines import error_line, result_line
from pipeline.prices import Price
from pipeline.send.client import check_completion
from pipeline.send.sse import assemble
from tests.strategies import deep, dumps, runs_stack, sometimes

READ_BUFFER = 1 << 10  # the client's is 1 MiB; small here, so that a line longer is reached

# -- chunks ---------------------------------------------------------------------------------------


SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=10),
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ODD = st.one_of(
    JSON,
    st.builds(
        deep, st.sampled_from([252, 253, 254, 300, 900, 1000, 1023]), st.sampled_from(["list", "dict"])
    ),
)


INDEX = sometimes(
    st.one_of(st.sampled_from([-1, 127, 128, 10**6, 2**64, "0", 1.0, True, None]), ODD), st.integers(0, 2)
)
TOOL_CALL = sometimes(
    ODD,
    st.fixed_dictionaries(
        {"index": INDEX},
        optional={
            "id": st.text(max_size=5),
            "type": st.just("function"),
            "function": sometimes(
                ODD,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": sometimes(ODD, st.text(max_size=5)),
                        "arguments": sometimes(ODD, st.text(max_size=8)),
                    },
                ),
            ),
        },
    ),
)
DELTA = sometimes(
    ODD,
    st.fixed_dictionaries(
        {},
        optional={
            "role": sometimes(ODD, st.just("assistant")),
            "content": sometimes(ODD, st.one_of(st.none(), st.text(max_size=10))),
            "refusal": sometimes(ODD, st.text(max_size=5)),
            "reasoning": sometimes(ODD, st.text(max_size=5)),
            "tool_calls": sometimes(ODD, st.lists(TOOL_CALL, max_size=3)),
            "reasoning_details": ODD,
        },
    ),
)
LOGPROBS = sometimes(
    ODD,
    st.fixed_dictionaries(
        {}, optional={"content": sometimes(ODD, st.lists(JSON, max_size=2)), "refusal": ODD}
    ),
)
FINISH = sometimes(
    ODD, st.sampled_from([None, None, "stop", "length", "tool_calls", "content_filter", "error", ""])
)
CHOICE = sometimes(
    ODD,
    st.fixed_dictionaries(
        {"index": INDEX, "delta": DELTA, "finish_reason": FINISH},
        optional={"logprobs": LOGPROBS, "error": ODD},
    ),
)
USAGE = sometimes(
    ODD,
    st.fixed_dictionaries({"prompt_tokens": st.integers(0, 100), "completion_tokens": st.integers(0, 100)}),
)
ERROR = st.one_of(
    st.fixed_dictionaries(
        {
            "message": sometimes(ODD, st.text(max_size=20)),
            "code": sometimes(ODD, st.sampled_from([400, 429, 500, 502, 503, "rate_limited"])),
        }
    ),
    st.text(max_size=20),
    ODD,
)
CHUNK = st.fixed_dictionaries(
    {"choices": sometimes(ODD, st.lists(CHOICE, max_size=3))},
    optional={
        "id": sometimes(ODD, st.just("chatcmpl-1")),
        "object": st.just("chat.completion.chunk"),
        "model": sometimes(ODD, st.just("m")),
        "usage": USAGE,
        "error": sometimes(ERROR, st.none(), one_in=10),
        "created": st.integers(),
    },
)

# -- events and streams ---------------------------------------------------------------------------


def _data(value: Any, *, ascii_only: bool = True, nan: bool = False) -> bytes:
    try:
        return dumps(value, ascii_only=ascii_only, nan=nan)
    except ValueError:  # NaN, not allowed this time
        return b"{}"


# A well-formed piece of an answer: content, a tool call or a reasoning delta for choice 0 or 1.
GOOD = st.builds(
    lambda index, delta: {
        "id": "chatcmpl-1",
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": None}],
    },
    st.integers(0, 1),
    st.one_of(
        st.fixed_dictionaries({"content": st.text(max_size=10)}),
        st.fixed_dictionaries({"tool_calls": st.lists(TOOL_CALL, max_size=2)}),
        st.fixed_dictionaries({"reasoning": st.text(max_size=5)}),
    ),
)
ODD_EVENT = st.one_of(
    # a chunk of any shape, written with NaN now and then, raw surrogates or escaped ones
    st.builds(
        lambda c, a, n: [b"data: " + _data(c, ascii_only=a, nan=n)], CHUNK, st.booleans(), st.booleans()
    ),
    # a chunk split over several data lines (joined with newlines: still JSON)
    st.builds(lambda c: [b"data: " + part for part in _data(c).split(b",")], CHUNK),
    st.builds(lambda v: [b"data: " + _data(v)], ODD),  # not an object
    st.builds(lambda b: [b"data: " + b], st.binary(max_size=30).filter(lambda b: b"\n" not in b)),
    st.just([b"data: [DONE]"]),
    st.just([b"data: " + b"[" * 1100 + b"]" * 1100]),  # past orjson's 1,024 levels
    st.just([b"data: " + _data({"choices": [{"index": 0, "delta": {"content": "x" * (READ_BUFFER * 3)}}]})]),
)
NOISE = st.sampled_from(
    [
        [b": OPENROUTER PROCESSING"],
        [b"event: message"],
        [b"id: 7"],
        [b"retry: 1000"],
        [b"data:"],
        [b"nonsense"],
    ]
)
EVENT = sometimes(st.one_of(ODD_EVENT, NOISE), GOOD.map(lambda chunk: [b"data: " + _data(chunk)]), one_in=5)
# An error carrying a value nested deep, under what orjson reads: kept whole, its line of
# errors.jsonl could not be written. (Among the odd events it came first too seldom to be met.)
DEEP_ERROR = st.builds(
    lambda value, where, choice: [
        b"data: "
        + _data(
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "error", "error": {where: value}}]}
            if choice
            else {"error": {"message": "x", "code": 400, where: value}}
        )
    ],
    st.builds(deep, st.sampled_from([300, 1000]), st.sampled_from(["list", "dict"])),
    st.sampled_from(["message", "code", "param"]),
    st.booleans(),
)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """The stream's bytes, cut into the pieces in which they arrive."""
    if draw(st.sampled_from([False] * 7 + [True])):
        data = draw(st.binary(max_size=300))
    else:
        events = draw(st.lists(EVENT, max_size=8))
        if draw(st.sampled_from([False] * 9 + [True])):
            events.insert(0, draw(DEEP_ERROR))
        if draw(st.sampled_from([True, True, True, False])):  # the end: finish reasons, usage
            last = {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(2)]}
            events.append([b"data: " + _data({**last, "usage": draw(USAGE)})])
        if draw(st.sampled_from([True, True, True, False])):
            events.append([b"data: [DONE]"])
        end = draw(st.sampled_from([b"\n", b"\r\n"]))
        data = b"".join(b"".join(line + end for line in lines) + end for lines in events)
        if draw(st.sampled_from([False] * 5 + [True])):
            data = data[: draw(st.integers(0, len(data)))]  # cut short
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


class Connection(BaseProtocol):
    """A connection that stays open until the stream's end, and that nothing pauses."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.transport = asyncio.Transport()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


async def read(pieces: list[bytes]) -> dict[str, Any]:
    """What the client does with a streamed answer's bytes (`Client._read_stream`), the
    pieces arriving while it reads."""
    loop = asyncio.get_running_loop()
    content = aiohttp.StreamReader(Connection(loop), READ_BUFFER, loop=loop)

    async def arrive() -> None:
        for piece in pieces:
            content.feed_data(piece)
            await asyncio.sleep(0)
        content.feed_eof()

    network = asyncio.ensure_future(arrive())
    try:
        return await assemble(content.iter_any())
    finally:
        await network


def written(error: RequestError) -> None:
    """The line of errors.jsonl the error becomes when its request fails for good: written,
    and read back."""
    failure = Failure(
        line=1, code=error.code, message=error.message, custom_id="a", body=error.body, attempts=1
    )
    orjson.loads(error_line(failure))


@given(streams())
@runs_stack
def test_any_stream_is_a_completion_or_a_typed_error(pieces: list[bytes]) -> None:
    try:
        body = asyncio.run(read(pieces))
    except RequestError as e:
        error = e
    else:
        error = None
    if error is not None:
        event(f"{type(error).__name__}: {error.message[:40]}")
        assert isinstance(error.message, str)
        assert len(error.message) < 500
        written(error)
        return
    event("a completion")
    assert body["object"] == "chat.completion"
    assert body["choices"]
    assert all(choice["finish_reason"] for choice in body["choices"])
    # What the run does with it: count its tokens, write its line.
    answer_tokens(body)
    request = Request(custom_id="a", line=1, payload=b"{}")
    line = result_line(Success(request=request, reply=Reply(body=body, raw=None), attempts=1))
    assert orjson.loads(line)["response"]["body"]["choices"]


# -- answers not streamed -------------------------------------------------------------------------

MESSAGE_CHOICE = sometimes(
    ODD,
    st.fixed_dictionaries(
        {"index": INDEX, "message": DELTA, "finish_reason": FINISH},
        optional={"logprobs": LOGPROBS, "text": ODD},
    ),
)
BODY = st.fixed_dictionaries(
    # (a scalar now and then: ODD alone is mostly text or nesting)
    {"choices": sometimes(st.one_of(SCALAR, ODD), st.lists(MESSAGE_CHOICE, max_size=3), one_in=6)},
    optional={
        "id": sometimes(ODD, st.just("chatcmpl-1")),
        "model": sometimes(ODD, st.just("m")),
        "usage": sometimes(ODD, st.fixed_dictionaries({"total_tokens": st.integers(1, 100)}), one_in=3),
        "error": sometimes(ERROR, st.none(), one_in=10),
    },
)


@given(st.one_of(BODY, ODD))
@runs_stack
def test_any_answer_not_streamed_is_kept_or_a_typed_error_and_counted(value: Any) -> None:
    raw = _data(value)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:  # nested past what orjson reads: the client says so itself
        return
    if too_deep(raw, body):  # so does it of one nested past what a results line can hold
        return
    books = Books(Usage(), {"m": Price(prompt=1.0, completion=2.0)})
    books.open_budget(10.0)
    request = Request(custom_id="a", line=1, payload=b"{}", model="m")
    try:
        check_completion(body)
    except RequestError as e:
        event(f"{type(e).__name__}")
        books.thrown_away(e.body, request)  # what the worker does with what it reported
        written(e)
        return
    event("a completion")
    books.billed(body, request)
    success = Success(request=request, reply=Reply(body=body, raw=None), attempts=1)
    books.kept([success])
    orjson.loads(result_line(success))
