"""A gone model fails its own lines, whatever order they come in, and the run goes on; a wrong
--base-url still stops the run at once. Told apart by what the 404 says, or by GET /models,
never by which answer came back first (a 404 in milliseconds, an answer later)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

import pipeline
from pipeline.send.client import _error_body
from pipeline.send.notfound import Said, read_404
from pipeline.send.status import http_error
from tests.conftest import bodies, read_jsonl
from tests.scripted import answer, json, scripted

GONE, GOOD = "old/retired", "test/model"
SHAPES: dict[str, tuple[Any, Any]] = {  # a 404 for the gone model, and GET /models
    "openrouter": ({"error": {"message": f"No endpoints found for {GONE}.", "code": 404}}, None),
    "openai": (
        {
            "error": {
                "message": f"The model `{GONE}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        },
        None,
    ),
    "empty body, listed models": (b"", {"object": "list", "data": [{"id": GOOD}]}),
    "empty body, no /models": (b"", None),
}


class Server:
    """404s for GONE (as `shape` says them), answers for the rest, a little later."""

    def __init__(self, shape: str, *, latency: float = 0.1) -> None:
        self.gone, self.models = SHAPES[shape]
        self.latency = latency
        self.asked = Counter[str]()
        self.back = False  # the model served again

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            self.asked["GET /models"] += 1
            return (
                json(self.models) if self.models is not None else web.Response(status=404, text="Not Found")
            )
        body = await request.json()
        self.asked[body["model"]] += 1
        if body["model"] == GONE and not self.back:
            if isinstance(self.gone, bytes):
                return web.Response(status=404, body=self.gone)
            return json(self.gone, status=404)
        await anyio.sleep(self.latency)  # an answer takes longer than a 404
        return answer(body)


def lines(order: str) -> list[dict[str, Any]]:
    """60 lines of the good model and 20 of the gone one: 10 of them first (or last), the
    others among the good ones; or 300 of the gone one first."""
    if order == "hundreds gone first":
        return [{**row, "model": GONE if i < 300 else GOOD} for i, row in enumerate(bodies(360))]
    rows = [{**row, "model": GOOD} for row in bodies(80)]
    if order == "gone first":
        gone = list(range(10)) + list(range(13, 73, 6))
    else:
        gone = list(range(4, 64, 6)) + list(range(70, 80))
    for i in gone:
        rows[i]["model"] = GONE
    return rows


@pytest.mark.parametrize("order", ["gone first", "gone last", "hundreds gone first"])
@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_gone_model_fails_its_own_lines_and_the_run_goes_on(
    shape: str, order: str, make_settings, tmp_path: Path
) -> None:
    server = Server(shape)
    rows = lines(order)
    gone = sorted(r["custom_id"] for r in rows if r["model"] == GONE)
    async with scripted(server) as s:
        summary = await pipeline.run(make_settings(s.url, rows, concurrency=32))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    if shape == "empty body, no /models" and order == "hundreds gone first":
        # The one case nothing tells apart from a wrong URL: the 404s name no model, there is
        # no /models to ask, and every request in flight is one of them. The run stops, naming
        # the model too, and the same command resumes it.
        assert summary.exit_code == 3
        assert GONE in summary.message
        assert "--base-url" in summary.message
        assert not results
        assert not errors
        return
    assert summary.exit_code == 1, summary.message
    assert Counter(r["response"]["body"]["model"] for r in results) == {GOOD: 60}
    assert sorted(e["custom_id"] for e in errors) == gone
    for error in errors:  # one each, naming the model and what the server said
        assert GONE in error["error"]["message"], error
        assert "404" in error["error"]["message"]
        assert error["error"]["code"] in ("http_error", "model_not_found")
    if shape != "empty body, no /models" and order != "gone last":
        assert server.asked[GONE] <= 32  # later lines of a model found gone are not sent
    assert server.asked["GET /models"] <= 1


async def test_lines_failed_unsent_are_tried_again_by_the_next_run(make_settings, tmp_path: Path) -> None:
    server = Server("openrouter")
    async with scripted(server) as s:
        settings = make_settings(s.url, lines("gone first"), concurrency=8)
        first = await pipeline.run(settings)
        unsent = [
            e for e in read_jsonl(tmp_path / "out/errors.jsonl") if e["error"]["code"] == "model_not_found"
        ]
        server.back = True
        second = await pipeline.run(settings)
    assert (first.exit_code, first.failed, second.exit_code, second.succeeded) == (1, 20, 0, 20)
    assert unsent
    assert all(e["attempts"] == 0 for e in unsent)
    assert first.invalid_input == 0  # not sent, but not the input's fault
    ids = Counter(r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl"))
    assert len(ids) == 80
    assert max(ids.values()) == 1
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []


async def test_a_404_naming_another_model_fails_only_its_own_line(make_settings, tmp_path: Path) -> None:
    # An alias whose target is gone, or a model named in the body: the server's path is right,
    # but nothing says the model asked for is gone; each of its lines is sent, and fails.
    sent = Counter[str]()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sent[body["model"]] += 1
        if body["model"] == "alias/x":
            return json({"error": {"message": "The model `vendor/x-0613` does not exist"}}, status=404)
        await anyio.sleep(0.05)
        return answer(body)

    rows = [{**row, "model": "alias/x" if i < 8 or i % 4 == 0 else GOOD} for i, row in enumerate(bodies(40))]
    async with scripted(handler) as s:
        summary = await pipeline.run(make_settings(s.url, rows, concurrency=16))
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert (summary.exit_code, summary.succeeded, len(errors)) == (1, 24, 16), summary.message
    assert {e["error"]["code"] for e in errors} == {"http_error"}
    assert sent["alias/x"] == 16  # every one sent, and answered so


@pytest.mark.parametrize(
    "page",
    [
        b'{"detail":"Not Found"}',
        b'{"error":{"message":"Not Found","code":404}}',
        b"<html><body><h1>404 Not Found</h1></body></html>",
        b"",
    ],
)
async def test_a_wrong_base_url_stops_the_run_at_once_and_shows_no_password(
    page: bytes, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Counter[str]()

    async def everything_404(request: web.Request) -> web.StreamResponse:
        seen[request.method] += 1
        return web.Response(status=404, body=page, content_type="application/json")

    monkeypatch.delenv("LUMENFALL_API_KEY")  # a local endpoint: the URL's own credentials
    async with scripted(everything_404) as s:
        url = s.url.replace("http://", "http://someone:hunter2secret@")
        summary = await pipeline.run(make_settings(url, bodies(300, model=GOOD), concurrency=8))
    assert summary.exit_code == 3
    assert f"POST http://someone:***@127.0.0.1:{s.port}/v1/chat/completions" in summary.message
    assert GOOD in summary.message
    assert "--base-url" in summary.message
    assert seen["POST"] < 30
    assert seen["GET"] == 1
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []  # nothing failed: all to do again
    for path in (tmp_path / "out").iterdir():
        if path.is_file():
            assert b"hunter2secret" not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("model", "body", "said"),
    [
        (GONE, {"error": {"message": f"No endpoints found for {GONE}.", "code": 404}}, Said.GONE),
        ("x/y:free", {"error": {"message": "No endpoints found for x/y:free.", "code": 404}}, Said.GONE),
        (
            "gpt-4.1",
            {"error": {"message": "The model `gpt-4.1` does not exist or you do not have access to it."}},
            Said.GONE,
        ),
        ("llama3", {"error": 'model "llama3" not found, try pulling it first'}, Said.GONE),  # Ollama
        ("m", {"error": {"message": "model not found", "code": "model_not_found"}}, Said.GONE),
        (
            "m",
            {"object": "error", "message": "The model `m` does not exist.", "type": "NotFoundError"},
            Said.GONE,
        ),
        ("alias/x", {"error": {"message": "The model `vendor/x-0613` does not exist"}}, Said.OTHER),
        ("a/b", {"error": {"message": "No endpoints found for c/d."}}, Said.OTHER),  # a fallback's
        (
            "a/b",
            {"error": {"message": "No endpoints found that support tool use. To learn more, visit ..."}},
            Said.OTHER,
        ),
        ("m", {"detail": "Not Found"}, Said.SILENT),
        ("m", {"error": {"message": "Not Found", "code": 404}}, Said.SILENT),
        ("m", "<html><body><h1>404 Not Found</h1></body></html>", Said.SILENT),
        ("m", "", Said.SILENT),
        ("openai/gpt-4o", {"error": {"message": "Invalid URL (POST /v2/chat/completions)"}}, Said.SILENT),
    ],
)
def test_what_a_404_says(model: str, body: Any, said: Said) -> None:
    raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
    parsed, message = _error_body(raw)
    assert read_404(http_error(404, message, body=parsed), model) is said


@pytest.mark.parametrize("failing", ["a few 500s", "an outage"])
async def test_a_404_saying_nothing_waits_for_requests_that_failed_for_now(
    failing: str, make_settings, tmp_path: Path
) -> None:
    # No /models, 404s that name no model: the other model's requests decide. Those that fail
    # for now (a 500 retried, an outage's pause) still may answer: nothing being in flight for
    # a moment between their attempts is no verdict (it stopped the run, exit 3, "check
    # --base-url", though the next attempt answered).
    failures = Counter[str]()
    broken = anyio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.Response(status=404, text="Not Found")
        body = await request.json()
        if body["model"] == GONE:
            if not broken.is_set():
                broken.set()
                tg.start_soon(recover)
            return web.Response(status=404, body=b"")
        await anyio.sleep(0.05)
        if failing == "a few 500s" and failures["500"] < 3:
            failures["500"] += 1
            return json({"error": {"message": "oops"}}, status=500)
        if failing == "an outage" and not back.is_set():
            failures["reset"] += 1
            assert request.transport is not None
            request.transport.abort()
        return answer(body)

    back = anyio.Event()

    async def recover() -> None:
        await anyio.sleep(0.3)
        back.set()

    rows = [{**row, "model": GONE if i < 5 else GOOD} for i, row in enumerate(bodies(40))]
    async with scripted(handler) as s, anyio.create_task_group() as tg:
        summary = await pipeline.run(make_settings(s.url, rows, concurrency=8))
    assert summary.exit_code == 1, summary.message
    assert failures
    assert summary.succeeded == 35
    assert sorted(e["custom_id"] for e in read_jsonl(tmp_path / "out/errors.jsonl")) == [
        f"job-{i}" for i in range(5)
    ]


@pytest.mark.parametrize(
    "listing",
    [
        b'{"data": [{"id": ' + b"[" * 1000 + b"]" * 1000 + b"}]}",  # str() of it: RecursionError
        b'{"data": [{"id": null}, 7, {"name": {"x": 1}}]}',
    ],
)
async def test_a_models_list_of_odd_names_still_says_the_path_is_right(
    listing: bytes, make_settings, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.Response(body=listing, content_type="application/json")
        return web.Response(status=404, body=b"")

    async with scripted(handler) as s:
        summary = await pipeline.run(make_settings(s.url, bodies(3, model=GONE), concurrency=2))
    assert summary.exit_code == 1, summary.message  # a list: the path is right, the lines fail
    assert len(read_jsonl(tmp_path / "out/errors.jsonl")) == 3


@pytest.mark.parametrize("empty", ["", None])
async def test_a_line_whose_model_is_empty_goes_as_the_jobs_model(
    empty: str | None, make_settings, tmp_path: Path
) -> None:
    # Sent with "model": "" while it counted as the job's model's line, its 404 ("The model ``
    # does not exist", vLLM's words) marked the job's model gone: 47 lines of 50 failed.
    sent = Counter[Any]()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sent[body.get("model")] += 1
        if not body.get("model"):
            said = f"The model `{body.get('model') or ''}` does not exist."
            return json({"object": "error", "message": said, "type": "NotFoundError"}, status=404)
        return answer(body)

    rows = [{key: value for key, value in row.items() if key != "model"} for row in bodies(50)]
    rows[0]["model"] = empty
    async with scripted(handler) as s:
        summary = await pipeline.run(make_settings(s.url, rows, model=GOOD, concurrency=4))
    assert (summary.exit_code, summary.succeeded) == (0, 50), summary.message
    assert sent == {GOOD: 50}
