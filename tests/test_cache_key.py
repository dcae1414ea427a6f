"""The answer cache's key: the same question shares an answer, a different one never does."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache.key import request_key
from pipeline.input import jsonl
from pipeline.input.line import LineParser
from pipeline.send.attempts import Attempts
from tests.test_images import png

BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "max_tokens": 60,
    "temperature": 0,
    "messages": [
        {"role": "system", "content": "You caption photos."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "This one"}, {"type": "text", "text": "please"}],
        },
    ],
}


def key(body: dict[str, Any], **kw: Any) -> bytes:
    return request_key(orjson.dumps(body), **kw)


def reordered(value: Any, rng: random.Random) -> Any:
    """`value` with the keys of every object in another order (arrays untouched)."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: reordered(v, rng) for k, v in items}
    if isinstance(value, list):
        return [reordered(v, rng) for v in value]
    return value


def test_key_order_does_not_matter_and_array_order_does() -> None:
    rng = random.Random(7)
    assert key(reordered(BASE, rng)) == key(BASE)
    swapped = {**BASE, "messages": BASE["messages"][::-1]}
    assert key(swapped) != key(BASE)
    parts = BASE["messages"][1]["content"]
    assert key({**BASE, "messages": [BASE["messages"][0], {"role": "user", "content": parts[::-1]}]}) != key(
        BASE
    )


def test_every_parameter_counts_even_one_nobody_knows() -> None:
    changed = [
        {**BASE, "model": "gpt-4o"},
        {**BASE, "max_tokens": 120},
        {**BASE, "temperature": 0.7},
        {**BASE, "seed": 1},
        {**BASE, "n": 2},
        {**BASE, "response_format": {"type": "json_object"}},
        {**BASE, "some_new_knob": True},
        {**BASE, "messages": [*BASE["messages"][:1], {"role": "user", "content": "This one please"}]},
    ]
    keys = {key(body) for body in changed}
    assert len(keys) == len(changed)
    assert key(BASE) not in keys


def test_a_streamed_request_shares_the_answer_of_an_unstreamed_one_and_so_do_tags() -> None:
    streamed = {**BASE, "stream": True, "stream_options": {"include_usage": True}}
    tagged = {**BASE, "metadata": {"row": 17}, "user": "u-42", "store": True, "service_tier": "flex"}
    hinted = {**BASE, "prompt_cache_key": "system-3"}
    assert key(streamed) == key(tagged) == key(hinted) == key(BASE)


def test_prompt_cache_markers_are_left_out_but_a_schema_property_of_that_name_is_not() -> None:
    marked = orjson.loads(orjson.dumps(BASE))
    marked["messages"][0]["cache_control"] = {"type": "ephemeral"}
    marked["messages"][1]["content"][0]["cache_control"] = {"type": "ephemeral"}
    assert key(marked) == key(BASE)

    def schema(props: dict[str, Any]) -> dict[str, Any]:
        return {**BASE, "response_format": {"type": "json_schema", "json_schema": {"schema": props}}}

    plain = schema({"type": "object", "properties": {"a": {"type": "string"}}})
    named = schema({"type": "object", "properties": {"a": {"type": "string"}, "cache_control": {}}})
    assert key(named) != key(plain)


def test_the_endpoint_scopes_the_key() -> None:
    assert key(BASE, scope="http://127.0.0.1:8000/v1") != key(BASE, scope="https://api.openai.com/v1")


def test_integers_past_64_bits_are_told_apart() -> None:
    # orjson reads both as the same float: only the exact reading tells them apart.
    a = b'{"model":"m","messages":[],"metadata_hint":36893488147419103232}'
    b = b'{"model":"m","messages":[],"metadata_hint":36893488147419103233}'
    assert request_key(a) != request_key(b)
    assert request_key(a) == request_key(b'{"metadata_hint":36893488147419103232,"messages":[],"model":"m"}')


async def test_local_images_count_by_their_bytes_once_filled(tmp_path: Path, make_settings: Any) -> None:
    (tmp_path / "a.png").write_bytes(png(8))
    (tmp_path / "b.png").write_bytes(png(9))
    (tmp_path / "c.png").write_bytes(png(8))  # a's bytes, another name
    job = tmp_path / "job.toml"
    job.write_text(
        '[request]\nmodel = "vision/model"\nmax_tokens = 50\n[template]\nid = "{asset_id}"\n'
        '[[template.messages]]\nrole = "user"\n'
        'content = [{ type = "text", text = "Alt text" }, { type = "image", path = "image_path" }]\n'
    )
    rows = [{"asset_id": name, "image_path": f"{name}.png"} for name in "abc"]
    settings = make_settings("http://127.0.0.1:1/v1", rows, job=job)
    parser = LineParser(settings)
    requests = [
        parser.request(parser.parse(line), custom_id=str(i), line=i)
        for i, line in enumerate((tmp_path / "input.jsonl").read_bytes().splitlines())
    ]
    unfilled = [request_key(r.payload) for r in requests]
    assert unfilled[0] == unfilled[1]  # (markers only: the key must be made once they are filled)
    attempts = Attempts(
        gate=None,
        client=None,
        judge=None,
        retry=None,
        books=SimpleNamespace(image=lambda *_: None),
        control=None,
    )  # type: ignore[arg-type]
    for request in requests:
        assert await attempts.fill(request) is None
    a, b, c = (request_key(r.payload) for r in requests)
    assert a != b
    assert a == c


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150)  # (a quarter of the usual: the property is simple, the run time is not)
@given(body=st.dictionaries(st.text(max_size=8), json_values, max_size=6), seed=st.integers(0, 2**16))
def test_property_a_body_and_its_keys_reordered_share_a_key(body: dict[str, Any], seed: int) -> None:
    shuffled = reordered(body, random.Random(seed))
    # (made as the reader makes a payload: integers past 64 bits the lossless way)
    assert request_key(jsonl.dumps(shuffled)) == request_key(jsonl.dumps(body))
    assert len(request_key(jsonl.dumps(body))) == 32


def test_a_payload_nested_deeper_than_orjson_writes_has_a_key() -> None:
    # A JSON schema from the job file is not bounded by the reader's depth: the payload is
    # written the standard library's way past orjson's 255 levels, and so must its key be.
    def nested(depth: int) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        for _ in range(depth):
            schema = {"type": "array", "items": schema}
        return {**BASE, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}

    deep, deeper = jsonl.dumps(nested(300)), jsonl.dumps(nested(301))
    assert request_key(deep) != request_key(deeper)  # (it raised orjson's TypeError: a run's crash)
    assert request_key(deep) == request_key(jsonl.dumps(reordered(nested(300), random.Random(2))))
