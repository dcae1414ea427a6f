"""Whatever an input line holds, the reader makes of it one request or one input error, and
never raises: a bad line is a line in errors.jsonl, never the end of the run.

The lines come from Hypothesis: any bytes; any JSON value (huge integers, NaN and Infinity
literals, lone surrogate escapes, nesting hundreds of levels deep); and lines shaped like
the three input shapes (an OpenAI Batch line, a bare body, a record for a `[template]`
whose image parts point at random paths in a folder of real and broken images, symlink
loops among them). Each is read the way `feed` reads it (`read_requests`), and whatever
comes out must also be writable as the line of results.jsonl or errors.jsonl it becomes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import InputError
from pipeline.input import jsonl
from pipeline.input.imagedata import encode
from pipeline.input.line import LineParser
from pipeline.input.reader import ReadCounts, read_requests
from pipeline.input.tokens import completion_bound
from pipeline.input.usual import read_usual
from pipeline.job import Failure, Reply, Request, Success
from pipeline.output.ledger import Ledger
from pipeline.output.lines import error_line, result_line
from pipeline.settings import build
from tests.strategies import deep, dumps, runs_stack, sometimes

# -- the folder the lines read from ---------------------------------------------------------


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (0, 200, 0)).save(out, format="PNG")
    return out.getvalue()


def _folder(root: Path) -> Path:
    """A catalogue's folder with every kind of file an image path may name."""
    images = root / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png(8))
    (images / "big.png").write_bytes(_png(700))  # sized down at detail low
    (images / "cut.png").write_bytes(_png(64)[:40])  # truncated
    (images / "text.png").write_text("not an image")
    (images / "empty.jpg").write_bytes(b"")
    (images / "folder.png").mkdir()
    (images / "loop.png").symlink_to("loop.png")  # a symlink to itself
    (images / "a.png").symlink_to("b.png")  # two that point at each other
    (images / "b.png").symlink_to("a.png")
    (images / "dangling.png").symlink_to("gone.png")
    (images / "out.png").symlink_to(root / "outside.png")
    (root / "outside.png").write_bytes(_png(8))
    return images


NAMES = (
    "ok.png", "big.png", "cut.png", "text.png", "empty.jpg", "folder.png", "loop.png", "a.png",
    "b.png", "dangling.png", "out.png", "gone.png", "../outside.png", "loop.png/x", "",
    ".", "..", "/", "/etc/passwd", "~/x.png", "~nobody-here/x.png", "ok.png\0.txt", "\0",
    "x" * 300, "/".join(["d"] * 2000), "ok.png/", "./ok.png", "images/ok.png",
)  # fmt: skip

# -- JSON values that reach the interesting regions ------------------------------------------

# Integers at and past the 64 bits orjson can hold, floats at the edges, text with what no
# UTF-8 can hold.
INTS = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2),
    st.sampled_from([19, 20, 25, 400, 4000]).map(lambda digits: -(10**digits) if digits % 2 else 10**digits),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, 5e-324, -0.0]))
TEXT = st.text(max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\u2028", "{", "{x}", "{{", "\\"]
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


DEEP = st.builds(
    deep,
    st.sampled_from([199, 200, 201, 254, 255, 500, 990, 1000, 1023, 1100]),
    st.sampled_from(["list", "dict"]),
)


WILD = sometimes(DEEP, VALUES, one_in=30)  # any value at all, now and then nested too deep
ANY = st.one_of(VALUES, DEEP)


@st.composite
def lines_of(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    # NaN and Infinity literals, surrogates escaped (ascii) or raw (invalid UTF-8)
    return dumps(draw(values), ascii_only=draw(st.booleans()))


# -- the three shapes ---------------------------------------------------------------------------

ID = sometimes(st.one_of(TEXT, INTS, WILD), st.uuids().map(str))
PART = sometimes(
    WILD,
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries(
            {
                "type": st.just("image_url"),
                "image_url": st.fixed_dictionaries({"url": TEXT}, optional={"detail": TEXT}),
            }
        ),
    ),
)
MESSAGE = sometimes(
    WILD,
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"])},
        optional={
            "content": sometimes(WILD, st.one_of(TEXT, st.lists(PART, max_size=3))),
            "name": sometimes(WILD, TEXT),
            "tool_calls": WILD,
            "tool_call_id": WILD,
        },
    ),
)
WHOLE = sometimes(WILD, st.integers(min_value=1, max_value=2**70))  # a whole number field
BODY = st.fixed_dictionaries(
    {"messages": sometimes(WILD, st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={
        # (an empty or null model is none: the job's, or no model at all)
        "model": sometimes(st.one_of(WILD, st.sampled_from(["", None])), st.just("m")),
        "max_tokens": WHOLE,
        "max_completion_tokens": WHOLE,
        "n": WHOLE,
        "temperature": sometimes(WILD, FLOATS),
        "stream": sometimes(WILD, st.booleans()),
        "stream_options": sometimes(
            WILD, st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})
        ),
        "tools": WILD,
        "functions": WILD,
        "response_format": WILD,
        "models": sometimes(WILD, st.lists(TEXT, max_size=2)),
        "custom_id": ID,
        "metadata": WILD,
    },
)
BATCH = st.fixed_dictionaries(
    {
        "custom_id": ID,
        "body": sometimes(WILD, BODY),
        "url": sometimes(WILD, st.just("/v1/chat/completions")),
    },
    optional={"method": sometimes(WILD, st.just("POST")), "metadata": WILD},
)
RECORD = st.fixed_dictionaries(
    {"asset_id": ID, "image_path": sometimes(st.one_of(TEXT, WILD), st.sampled_from(NAMES), one_in=4)},
    optional={"title": WILD, "url": sometimes(WILD, TEXT, one_in=3), "custom_id": WILD},
)
RAW = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [b"", b" \n", b"\xff\xfe", b"{", b"[" * 5000, b"1e400", b"NaN", b"\x1f\x8b\x08", b"9" * 5000]
    ),
    # an integer past what Python turns into text by default (4,300 digits)
    st.just(b'{"model": "m", "messages": [{"role": "user"}], "seed": ' + b"9" * 5000 + b"}"),
)

# -- reading one line as `feed` does -------------------------------------------------------------


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LineParser]:
    root = tmp_path_factory.mktemp("lines")
    images = _folder(root)
    job = root / "job.toml"
    job.write_text(
        '[request]\nmodel = "vision/model"\n'
        '[template]\nid = "{asset_id}"\n[[template.messages]]\nrole = "user"\n'
        'content = [{ type = "text", text = "Alt text for {title?} ({asset_id})" }, '
        '{ type = "image", url = "url", path = "image_path", detail = "low" }]\n'
    )
    flags = {"input": str(root / "in.jsonl"), "output": str(root / "out"), "model": "default/m"}
    plain = LineParser(build(None, **flags), exact_tokens=True)
    bare = LineParser(build(None, **{**flags, "model": None}))  # no model but what lines name
    records = LineParser(build(job, input=str(images / "in.jsonl"), output=str(root / "out")))
    return {"plain": plain, "bare": bare, "records": records}


def read_one(parser: LineParser, raw: bytes) -> Request | Failure | None:
    """The line read as the run reads it: a request, one input error, or nothing (empty)."""
    counts = ReadCounts()
    ledger = Ledger(Path(":memory:"))
    try:
        out = [
            item
            for item in read_requests(
                Path("in.jsonl"), parser, ledger, counts, is_done=lambda _: False, source=[(7, raw)]
            )
            if item is not None
        ]
    finally:
        ledger.close()
    assert len(out) <= 1
    if not out:
        assert not raw.strip()
        assert counts.empty == 1
        return None
    [item] = out
    event(f"input error: {item.code} {item.extra.get('field')}" if isinstance(item, Failure) else "a request")
    if isinstance(item, Failure):
        assert item.is_input_error
        assert item.code != "reader_error", item.message  # foreseen: a message that says what is wrong
        assert item.line == 7
        assert isinstance(item.message, str)
        assert 0 < len(item.message) < 1000, "a message names what is wrong, it does not quote the line"
        line = error_line(item)  # what errors.jsonl gets
        assert b"\n" not in line[:-1]
        json.loads(line)
        return item
    assert isinstance(item, Request)
    sent = jsonl.loads(item.payload)  # the body the server gets is JSON
    # ...naming the model the run counts it under (a 404 for it marks that model gone), or
    # none, when OpenRouter's fallback list names it
    assert sent.get("model", item.model) == item.model
    assert item.model
    assert item.prompt_tokens >= 0
    for image in item.images or ():
        with contextlib.suppress(InputError):
            encode(image)  # what the worker does just before the first attempt
    reply = Reply(body={"choices": []}, raw=None)
    line = result_line(Success(request=item, reply=reply, attempts=1))  # what results.jsonl gets
    assert b"\n" not in line[:-1]
    json.loads(line)
    return item


@given(RAW)
@runs_stack
def test_any_bytes_are_a_request_or_one_input_error(place: dict[str, LineParser], raw: bytes) -> None:
    read_one(place["plain"], raw)
    read_one(place["records"], raw)


@given(lines_of(ANY))
@runs_stack
def test_any_json_value_is_a_request_or_one_input_error(place: dict[str, LineParser], raw: bytes) -> None:
    read_one(place["plain"], raw)


@given(st.one_of(lines_of(BODY), lines_of(BATCH)))
# A fallback list whose first name is empty names no model: it was sent with none.
@example(raw=b'{"messages": [{"role": "user"}], "models": [""]}')
@runs_stack
def test_any_body_or_batch_line_is_a_request_or_one_input_error(
    place: dict[str, LineParser], raw: bytes
) -> None:
    read_one(place["plain"], raw)
    read_one(place["bare"], raw)


@given(lines_of(RECORD))
@runs_stack
def test_any_record_is_a_request_or_one_input_error(place: dict[str, LineParser], raw: bytes) -> None:
    read_one(place["records"], raw)


def test_the_folder_holds_what_the_records_name(place: dict[str, LineParser]) -> None:
    """(The strategies' folder is as meant: a loop is a loop, not a missing file.)"""
    images = place["records"].image_root
    assert os.path.islink(images / "loop.png")
    assert (images / "ok.png").stat().st_size > 0


# -- the usual line's one pass reads as the four passes do ---------------------------------------

# Lines of the usual shape (`pipeline.input.usual`), now and then odd in one place: digits in
# runs of 20 in the text (what the scan for long integers finds) beside floats, integers past
# 64 bits, ids that are numbers, metadata of any kind.
DIGITS = st.text(alphabet="0123456789 ", min_size=18, max_size=24)
USUAL_MESSAGE = sometimes(
    MESSAGE,
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.one_of(TEXT, DIGITS)}),
)
USUAL = st.fixed_dictionaries(
    {"messages": sometimes(WILD, st.lists(USUAL_MESSAGE, min_size=1, max_size=3))},
    optional={
        "custom_id": ID,
        "model": sometimes(st.one_of(WILD, st.sampled_from(["", None])), st.just("m")),
        "max_tokens": WHOLE,
        "n": WHOLE,
        "temperature": sometimes(WILD, FLOATS),
        "stream": sometimes(WILD, st.booleans()),
        "user": st.one_of(TEXT, DIGITS, INTS),
        "metadata": sometimes(WILD, st.dictionaries(st.text(max_size=4), SCALARS, max_size=3)),
        "tools": WILD,
    },
)
USUAL_BATCH = st.fixed_dictionaries(
    {"custom_id": ID, "body": USUAL, "url": sometimes(WILD, st.just("/v1/chat/completions"))},
    optional={"method": sometimes(WILD, st.just("POST")), "metadata": WILD},
)


def _fields(item: Request | Failure | None) -> Any:
    if item is None or isinstance(item, Failure):
        return item and (item.code, item.message, item.extra, item.custom_id, item.metadata, item.line)
    return tuple(getattr(item, name) for name in Request.__slots__)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[LineParser, LineParser]]:
    """Parsers in pairs, the first reading the usual line in one pass, the second as any line.
    The same lines go to both in the same order, so their estimates sample alike."""
    root = tmp_path_factory.mktemp("twins")
    flags = {"input": str(root / "in.jsonl"), "output": str(root / "out")}
    job = root / "job.toml"
    job.write_text('[request]\nmodel = "job/m"\nmax_tokens = 9\ntemperature = 0.5\n')
    made = [
        lambda: LineParser(build(None, **flags, model="default/m"), exact_tokens=True),
        lambda: LineParser(build(None, **flags)),
        lambda: LineParser(build(job, **flags)),
    ]
    return [(make(), make()) for make in made]


@given(st.one_of(lines_of(USUAL), lines_of(USUAL_BATCH), lines_of(BODY), lines_of(ANY)))
@example(raw=b'{"messages": [{"role": "user", "content": "12345678901234567890"}], "seed": 1.5}')
@example(raw=b'{"messages": [{"role": "user", "content": "a"}], "tools": [{"role": "user", "content": "b"}]}')
@example(raw=b'{"messages": [{"role": "user", "content": "a"}], "user": 123456789012345678901}')
@example(
    raw=b'{"custom_id": 7, "body": {"messages": [{"role": "user", "content": ""}]}, "url": '
    b'"/v1/chat/completions", "metadata": {"n": [-123456789012345678901]}}'
)
@runs_stack
def test_the_usual_lines_one_pass_reads_as_the_four_passes(
    twins: list[tuple[LineParser, LineParser]], raw: bytes
) -> None:
    event("read in one pass" if read_usual(raw)[0] is not None else "read as any line")
    for one_pass, four_passes in twins:
        new = read_one(one_pass, raw)
        with mock.patch("pipeline.input.line.read_usual", return_value=(None, None)):
            old = read_one(four_passes, raw)
        assert _fields(new) == _fields(old)
        assert one_pass.own_model == four_passes.own_model
        assert vars_of(one_pass.estimator) == vars_of(four_passes.estimator)


def vars_of(estimator: Any) -> dict[str, Any]:
    return {key: value for key, value in vars(estimator).items() if key != "_encoding"}


def completion_bound_before(body: dict[str, Any], default: int = 4096) -> tuple[int, bool]:
    """`tokens.completion_bound` as it was at 8427e57 (the reference)."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    bounded = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        n = 1
    return (limit if bounded else default) * n, bounded


class Whole(int):
    """An int of another type (an IntEnum, a numpy-like int from a caller's own settings)."""


BOUNDS = st.one_of(SCALARS, st.integers(-3, 10).map(Whole))


@given(
    st.fixed_dictionaries({}, optional={"max_tokens": BOUNDS, "max_completion_tokens": BOUNDS, "n": BOUNDS})
)
def test_the_completion_bound_reads_as_before(body: dict[str, Any]) -> None:
    assert completion_bound(body) == completion_bound_before(body)
