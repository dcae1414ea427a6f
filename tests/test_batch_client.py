"""The batch client, both shapes, against a batch API of the test's own (tests/batchfake.py):
what is sent, what is read back, and what a fault on the wire must never do (pay twice,
give a line twice or torn, show the key)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import HTTPStatusError, RunStopped
from pipeline.input.jsonl import dumps
from pipeline.send.batchapi import TAG_KEY, BatchApi, BatchInfo, NoBatchApi, ResultLine
from pipeline.send.batchclient import open_batch_api
from pipeline.send.batchwire import LineSplitter, WithoutMember
from tests.batchfake import FakeBatches, Fault, fake_batches
from tests.conftest import FAKE_KEY


class Waits:
    """The retry policy's sleeps, noted and not slept."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def staged(tmp_path: Path, n: int, *, model: str = "test/model", name: str = "0.jsonl") -> Path:
    path = tmp_path / name
    rows = (
        {
            "custom_id": f"job-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
        for i in range(n)
    )
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def opened(
    fake: FakeBatches, shape: str | None = None, **options: Any
) -> AbstractAsyncContextManager[BatchApi]:
    options.setdefault("sleep", Waits())
    return open_batch_api(fake.url, FAKE_KEY, shape, **options)


def answer_line(custom_id: str, text: str = "ok") -> bytes:
    body = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
    }
    response = {"status_code": 200, "request_id": "req-1", "body": body}
    return orjson.dumps(
        {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": response, "error": None}
    )


async def collected(lines: AsyncIterator[ResultLine]) -> list[bytes]:
    """The lines as bytes (the inline shape gives them parsed, as it read them)."""
    return [line if isinstance(line, bytes) else dumps(line) async for line in lines]


# -- files shape ------------------------------------------------------------------------


async def test_files_submit_uploads_the_staged_file_and_tags_the_batch(tmp_path: Path) -> None:
    path = staged(tmp_path, 3)
    async with fake_batches("files") as fake, opened(fake) as api:
        info = await api.submit(path, tag="pipeline-out-0", model="test/model", lines=3)
    assert api.shape == "files"
    assert (info.status, info.tag, info.counts.total) == ("validating", "pipeline-out-0", 3)
    [uploaded] = fake.files.values()
    assert uploaded["filename"] == "pipeline-out-0.jsonl"
    assert fake.content[uploaded["id"]] == path.read_bytes()
    batch = fake.batches[info.id]
    assert batch["input_file_id"] == uploaded["id"]
    assert batch["metadata"] == {TAG_KEY: "pipeline-out-0"}


async def test_files_results_are_the_output_lines_then_the_error_lines(tmp_path: Path) -> None:
    async with fake_batches("files") as fake, opened(fake) as api:
        info = await api.submit(staged(tmp_path, 3), tag="t", model="test/model", lines=3)
        out = answer_line("job-0") + b"\n" + answer_line("job-2") + b"\n"
        err = b'{"id": "batch_req_x", "custom_id": "job-1", "response": null, "error": {"code": "batch_expired"}}\n'
        fake.finish(info.id, "expired", output=out, errors=err)
        ended = await api.get(info.id)
        got = await collected(api.results(ended))
    assert ended.ended
    assert ended.status == "expired"
    assert got == [answer_line("job-0"), answer_line("job-2"), err.strip()]


async def test_files_cancel_and_a_batch_ended_already(tmp_path: Path) -> None:
    async with fake_batches("files") as fake, opened(fake) as api:
        first = await api.submit(staged(tmp_path, 1), tag="a", model="test/model", lines=1)
        second = await api.submit(staged(tmp_path, 1), tag="b", model="test/model", lines=1)
        fake.finish(second.id)
        assert (await api.cancel(first.id)).status == "cancelling"
        assert (await api.cancel(second.id)).status == "completed"  # a 409, then a look
        with pytest.raises(HTTPStatusError) as caught:
            await api.get("batch_nope")  # a batch not there is no endpoint without batches
    assert caught.value.status == 404


async def test_find_pages_back_to_its_tag_and_stops_at_since(tmp_path: Path) -> None:
    async with fake_batches("files") as fake, opened(fake) as api:
        path = staged(tmp_path, 1)
        since = time.time()
        for n in range(150):
            await api.submit(path, tag=f"pipeline-out-{n}", model="test/model", lines=1)
        found = await api.find("pipeline-out-0", since=since)  # the oldest: on the second page
        assert found is not None
        assert found.id == "batch_0"
        assert await api.find("pipeline-out-elsewhere", since=since) is None
        for batch in list(fake.batches.values())[:140]:
            batch["created_at"] -= 3600  # made an hour before: past the minute of skew
        fake.seen.clear()
        assert await api.find("pipeline-out-0", since=since) is None
    assert fake.seen == ["GET /v1/batches?limit=100"]  # the first page reached them: no more


# -- inline shape -----------------------------------------------------------------------


async def test_inline_submit_posts_the_requests_after_endpoint_and_model(tmp_path: Path) -> None:
    path = staged(tmp_path, 3, model="openai/gpt-4o")
    async with fake_batches("inline") as fake, opened(fake) as api:
        info = await api.submit(path, tag="pipeline-out-4", model="openai/gpt-4o", lines=3)
    assert api.shape == "inline"
    assert (info.status, info.model, info.counts.total) == ("validating", "openai/gpt-4o", 3)
    [raw] = fake.posted
    assert list(orjson.loads(raw)) == ["endpoint", "model", "completion_window", "metadata", "requests"]
    body = orjson.loads(raw)
    assert body["metadata"] == {TAG_KEY: "pipeline-out-4"}
    sent = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert body["requests"] == [{"custom_id": s["custom_id"], "body": s["body"]} for s in sent]


async def test_inline_metadata_refused_is_sent_no_more(tmp_path: Path) -> None:
    refusal = {"error": {"message": "Unrecognized key(s) in object: 'metadata'", "code": 400}}
    async with fake_batches("inline", metadata=False) as fake, opened(fake) as api:
        fake.fault("create", Fault(status=400, body=refusal))
        first = await api.submit(staged(tmp_path, 2), tag="a", model="m/one", lines=2)
        second = await api.submit(staged(tmp_path, 3), tag="b", model="m/one", lines=3)
        fake.fault("create", Fault(status=400))  # another 400: the batch is wrong, not the field
        with pytest.raises(HTTPStatusError):
            await api.submit(staged(tmp_path, 1), tag="c", model="m/one", lines=1)
    assert [first.id, second.id] == ["batch_0", "batch_1"]
    assert [b"metadata" in raw for raw in fake.posted] == [False, False]
    assert sum(seen == "POST /v1/batches" for seen in fake.seen) == 4


async def test_inline_reads_a_finished_batch_past_its_results_and_pages_them(tmp_path: Path) -> None:
    async with fake_batches("inline") as fake, opened(fake) as api:
        info = await api.submit(staged(tmp_path, 2500), tag="t", model="test/model", lines=2500)
        tricky = 'a text with "results": [ and } ] { \\" in it'
        rows = [orjson.loads(answer_line(f"job-{i}", tricky)) for i in range(2499)]
        rows.append(
            {
                "id": "r",
                "custom_id": "job-2499",
                "response": None,
                "error": {"message": "no", "type": "server_error"},
            }
        )
        fake.results[info.id] = rows
        fake.finish(info.id)
        ended = await api.get(info.id)
        got = [orjson.loads(line) for line in await collected(api.results(ended))]
    assert (ended.status, ended.counts.total) == ("completed", 2500)
    assert got[:2499] == rows[:2499]
    assert got[2499]["error"] == {"message": "no", "type": "server_error", "code": "server_error"}
    assert [s for s in fake.seen if "/results" in s] == [  # pages of 1,000: OpenRouter's most
        f"GET /v1/batches/{info.id}/results?limit=1000",
        f"GET /v1/batches/{info.id}/results?limit=1000&cursor=1000",
        f"GET /v1/batches/{info.id}/results?limit=1000&cursor=2000",
    ]


async def test_inline_results_from_the_batch_where_there_is_no_results_path(tmp_path: Path) -> None:
    async with fake_batches("inline", results_path=False) as fake, opened(fake) as api:
        info = await api.submit(staged(tmp_path, 2), tag="t", model="test/model", lines=2)
        fake.results[info.id] = [orjson.loads(answer_line("job-0")), orjson.loads(answer_line("job-1"))]
        fake.finish(info.id)
        got = await collected(api.results(await api.get(info.id)))
    assert got == [answer_line("job-0"), answer_line("job-1")]


async def test_inline_a_cancelled_batch_has_no_results_and_cancels_once(tmp_path: Path) -> None:
    waits = Waits()
    async with fake_batches("inline") as fake, opened(fake, sleep=waits) as api:
        info = await api.submit(staged(tmp_path, 2), tag="t", model="test/model", lines=2)
        assert (await api.cancel(info.id)).status == "cancelling"
        fake.finish(info.id, "cancelled")
        ended = await api.cancel(info.id)  # a 409: it has ended
        got = await collected(api.results(ended))
    assert ended.status == "cancelled"
    assert got == []
    assert waits.seconds == []  # a 409 here is an answer, not a reason to ask again


async def test_inline_find_without_metadata_never_guesses_between_two(tmp_path: Path) -> None:
    # The batches are made by another client (a run since killed, a stranger): this one finds.
    async with fake_batches("inline", metadata=False) as fake, opened(fake) as api:
        since = time.time()
        async with opened(fake) as before:
            first = await before.submit(staged(tmp_path, 2), tag="a", model="m/one", lines=2)
            await before.submit(staged(tmp_path, 3), tag="b", model="m/one", lines=3)
        found = await api.find("a", since=since, model="m/one", lines=2)
        assert found is not None
        assert found.id == first.id
        assert await api.find("c", since=since, model="m/two", lines=2) is None
        async with opened(fake) as stranger:
            await stranger.submit(staged(tmp_path, 2), tag="c", model="m/one", lines=2)
        with pytest.raises(RunStopped) as caught:
            await api.find("a", since=since, model="m/one", lines=2)
        assert first.id in str(caught.value)
        assert caught.value.code == "batch_ambiguous"
        fake.batches[first.id]["status"] = "cancelled"  # a person cancelled the one not ours
        found = await api.find("a", since=since, model="m/one", lines=2)
    assert found is not None
    assert found.id == "batch_2"


# -- discovery --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_the_shape_is_the_one_the_endpoint_offers(shape: str) -> None:
    async with fake_batches(shape) as fake, opened(fake) as api:
        await api.check()
    assert api.shape == shape
    assert all(seen.startswith("GET ") for seen in fake.seen)  # looking costs nothing


async def test_openrouter_keeps_files_and_batches_inline(tmp_path: Path) -> None:
    # OpenRouter lists files (GET /api/v1/files, in a list of its own shape) and makes batches
    # only of posted requests: taken for OpenAI's shape, every batch would be refused.
    openrouters = {"_shape": "openrouter", "cursor": None, "data": [], "has_more": False}
    negotiated = {"_shape": "openai", "object": "list", "data": [], "has_more": False}
    openais = {"object": "list", "data": [], "has_more": False}
    async with fake_batches("inline") as fake:
        for listed in (openrouters, negotiated):  # no batch listed yet: the files say
            fake.fault("files", Fault(status=200, body=listed))
            async with opened(fake) as api:
                assert api.shape == "inline"
        async with opened(fake, "inline") as api:
            await api.submit(staged(tmp_path, 1), tag="t", model="test/model", lines=1)
        fake.fault("files", Fault(status=200, body=openais))  # files of other purposes
        async with opened(fake) as api:
            assert api.shape == "inline"  # its batches name no input file


async def test_an_endpoint_without_batches_says_sync_works() -> None:
    async with fake_batches("none") as fake:
        with pytest.raises(NoBatchApi) as caught:
            async with opened(fake):
                pass
        async with opened(fake, "inline") as api:
            with pytest.raises(NoBatchApi):
                await api.check()
    message = str(caught.value)
    assert "--tier sync" in message
    assert "\n" not in message
    assert all(seen.startswith("GET ") for seen in fake.seen)


async def test_a_web_page_for_any_path_is_no_batch_api() -> None:
    waits = Waits()
    async with fake_batches("inline") as fake:
        fake.fault("files", Fault(page=True))
        async with opened(fake, sleep=waits) as api:
            assert api.shape == "inline"  # (a page at /files, then a list at /batches)
        fake.fault("files", Fault(page=True))
        fake.fault("list", Fault(page=True))
        with pytest.raises(NoBatchApi):
            async with opened(fake, sleep=waits):
                pass
        fake.fault("list", Fault(status=401))
        with pytest.raises(HTTPStatusError):
            async with opened(fake, sleep=waits):
                pass
    assert waits.seconds == []  # none of it asked again


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_404_to_a_create_where_batches_list_is_about_the_batch(tmp_path: Path, shape: str) -> None:
    # A gateway's answer to a model it does not batch, or to a file it cannot see yet: the
    # batch API is there all the same (its list answers), and the run must not say otherwise.
    missing = {"error": {"message": "Model m/gone not found", "type": "not_found_error"}}
    async with fake_batches(shape) as fake, opened(fake) as api:
        fake.fault("create", Fault(status=404, body=missing))
        with pytest.raises(HTTPStatusError) as caught:
            await api.submit(staged(tmp_path, 1), tag="t", model="m/gone", lines=1)
        fake.fault("create", Fault(status=404))
        fake.fault("list", Fault(status=404))  # nor does the list answer: no batch API
        with pytest.raises(NoBatchApi):
            await api.submit(staged(tmp_path, 1), tag="u", model="m/gone", lines=1)
    assert caught.value.status == 404
    assert "Model m/gone not found" in caught.value.message
    assert fake.batches == {}


# -- faults on the wire -----------------------------------------------------------------


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_create_whose_answer_is_lost_makes_one_batch(tmp_path: Path, shape: str) -> None:
    async with fake_batches(shape) as fake, opened(fake) as api:
        fake.fault("create", Fault(drop="after"))  # made, then the connection dropped
        info = await api.submit(staged(tmp_path, 2), tag="t", model="test/model", lines=2)
        assert len(fake.batches) == 1
        assert info.id == "batch_0"
        fake.fault("create", Fault(drop="before"), Fault(status=502))  # not made, twice
        info = await api.submit(staged(tmp_path, 2), tag="u", model="test/model", lines=2)
    assert len(fake.batches) == 2
    assert info.id == "batch_1"
    assert sum(seen == "POST /v1/batches" for seen in fake.seen) == 4  # 1 + 3: none sent unlooked


async def test_a_429_waits_what_it_is_told_and_a_5xx_or_a_drop_backs_off(tmp_path: Path) -> None:
    waits = Waits()
    async with fake_batches("files") as fake, opened(fake, sleep=waits) as api:
        fake.fault("create", Fault(status=429, headers={"Retry-After": "7"}))
        info = await api.submit(staged(tmp_path, 1), tag="t", model="test/model", lines=1)
        assert waits.seconds == [7.0]
        fake.fault("get", Fault(status=503), Fault(drop="before"), Fault(status=500))
        assert (await api.get(info.id)).id == info.id
    assert len(fake.batches) == 1
    assert len(waits.seconds) == 4


@pytest.mark.parametrize("ranges", [True, False])
async def test_a_download_cut_mid_line_gives_each_line_once_and_whole(ranges: bool) -> None:
    lines = [answer_line(f"job-{i}", "x" * (i * 37 % 300)) for i in range(60)]
    async with fake_batches("files") as fake, opened(fake) as api:
        fake.ranges = ranges
        file_id = fake.add_file(b"\n".join(lines) + b"\n")
        fake.cut = [150, 1, 4000, 0, 2222]
        got = await collected(api.results(BatchInfo("batch_x", "completed", output_file=file_id)))
    assert got == lines
    assert len(fake.asked) == 6  # once, and again after each cut
    assert sum(spec.startswith("bytes=") for spec in fake.asked) >= 3  # from the last whole line


async def test_a_line_over_the_bound_is_read_past_and_named() -> None:
    big = answer_line("big", "y" * 5000)
    nameless = b'{"response": "' + b"z" * 5000 + b'"}'
    async with fake_batches("files") as fake, opened(fake, max_line_bytes=1000) as api:
        file_id = fake.add_file(b"\n".join([answer_line("a"), big, nameless, answer_line("b")]))
        got = await collected(api.results(BatchInfo("batch_x", "completed", output_file=file_id)))
    assert got[0] == answer_line("a")
    assert got[2] == answer_line("b")
    assert len(got) == 3
    error = orjson.loads(got[1])
    assert error["custom_id"] == "big"
    assert error["error"]["code"] == "line_too_long"


async def test_the_key_is_in_no_error_message() -> None:
    echoed = {"error": {"message": f"Incorrect API key provided: {FAKE_KEY}", "code": "invalid_api_key"}}
    async with fake_batches("files") as fake, opened(fake) as api:
        fake.fault("get", Fault(status=401, body=echoed))
        with pytest.raises(HTTPStatusError) as caught:
            await api.get("batch_0")
    error = caught.value
    assert error.status == 401
    assert not error.transient
    shown = str(error) + error.message + orjson.dumps(error.body).decode()
    assert FAKE_KEY not in shown
    assert "Incorrect API key" in shown


# -- reading, whatever the chunks -------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(alphabet='ab"\\[]{}:, \n\u00e9'),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='rsu"\\lt:'), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(st.text(alphabet='rsu"\\lt:'), _json, max_size=5),
    _json,
    st.lists(st.integers(1, 40), max_size=8),
)
def test_a_member_read_past_leaves_the_rest_as_it_was(
    obj: dict[str, Any], results: Any, cuts: list[int]
) -> None:
    whole = {**obj, "results": results}
    raw = orjson.dumps(whole)
    reader = WithoutMember(b"results")
    at = 0
    for size in [*cuts, len(raw)]:
        reader.feed(raw[at : at + size])
        at += size
    assert orjson.loads(reader.joined()) == {
        **whole,
        "results": None if isinstance(results, list | dict) else results,
    }


@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10),
    st.lists(st.integers(1, 25)),
)
def test_lines_come_whole_whatever_the_chunks(lines: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(line + b"\n" for line in lines)
    split = LineSplitter(20)
    got: list[tuple[bytes | None, int]] = []
    at = 0
    for size in [*cuts, len(raw)]:
        got += [(line, size) for line, size, _ in split.feed(raw[at : at + size])]
        at += size
    assert got == [(line + b"\n" if len(line) < 20 else None, len(line) + 1) for line in lines]


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_delete_is_tried_again_as_the_retry_policy_says_and_a_refusal_is_raised_at_once(
    tmp_path: Path, shape: str
) -> None:
    async with fake_batches(shape) as fake, opened(fake, shape) as api:
        info = await api.submit(staged(tmp_path, 1), tag="t-1", model="test/model", lines=1)
        fake.finish(info.id, output=answer_line("job-0"))
        info = await api.get(info.id)
        files = [f for f in (info.input_file, info.output_file) if f]
        assert len(files) == (2 if shape == "files" else 0)
        fake.fault("delete", Fault(status=503), Fault(drop="before"))
        await api.clear(info.id, files)
        assert not (fake.files.keys() & set(files)) if shape == "files" else info.id not in fake.batches
        await api.clear(info.id, files)  # gone already: 404s, no failure
        deletes = [seen for seen in fake.seen if seen.startswith("DELETE")]
        assert len(deletes) == (2 + 2 + 2 if shape == "files" else 3 + 1)
        fake.fault("delete", Fault(status=403))
        with pytest.raises(HTTPStatusError) as refused:
            await api.clear(info.id, files or ["file-x"])
        assert refused.value.status == 403
