"""The built-in OpenAI-compatible endpoint, for demos, tests and the benchmark.

`pipeline mock --port N` serves `POST /v1/chat/completions` (any prefix) with deterministic
answers (`pipeline.mock.answers`): the same messages get the same reply. `usage` is realistic
(prompt tokens estimated from the text, `cost` at $0.50 / $1.50 per million tokens), `stream:
true` answers as SSE, `n`, `tools`, `logprobs` and `response_format` with a JSON schema are
honoured.

Switches add latency (fixed, jittered, or spread from short answers to long reasoning ones,
the same for a job on every try) and faults: 5xx, 429 with Retry-After, dropped connections
(before the answer, or after it was produced, as a real network would), malformed bodies,
errors inside a 200, streams cut short or stalled, rate limits counted as real servers count
them, the account's and each model's (`pipeline.mock.admission`), a key the server refuses,
credits that run out. It serves a provider's batch APIs too, OpenAI's files shape or
OpenRouter's inline one (`pipeline.mock.batchroutes`), batches moving on the same clock as the
limits, and can keep a provider's prompt cache (`pipeline.mock.prefixcache`). Tests start it
in-process (`pipeline.mock.hosting`); the benchmark reads its counters (`pipeline.mock.state`:
statuses, what the limits let through, the tokens served and cached) from `GET /mock/stats`.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import orjson
from aiohttp import web

from pipeline.mock.answers import completion, job_key, stream_chunks, text_of
from pipeline.mock.batches import Batches
from pipeline.mock.batchroutes import add_batch_routes
from pipeline.mock.config import KEEP_ALIVE, MockConfig
from pipeline.mock.files import FileStore
from pipeline.mock.state import MockState

__all__ = ["MockConfig", "MockServer", "completion", "job_key"]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": status}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without a whole answer."""
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}
    )
    await response.prepare(request)
    await response.write(b'{"id": "chatcmpl-dropped", "choi')
    transport = request.transport
    if transport is not None:
        transport.abort()
    return response


class MockServer:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.state = MockState(config=config, rng=random.Random(config.seed))
        self.files = FileStore(config.clock, self.state.batch)  # on disk, removed when the app stops
        self.batches = Batches(config, self.files, self.state)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{prefix:.*}chat/completions", self.chat)
        app.router.add_get("/mock/stats", self.stats)
        app.router.add_get("/{prefix:.*}models", self.models)
        add_batch_routes(app, self.config, self.files, self.batches)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        self.files.close()

    async def stats(self, request: web.Request) -> web.Response:
        await self.batches.settle()  # a batch that ended unseen still counts what it answered
        stats = self.state.stats()
        if "jobs" in request.query:  # every job's answers, by its key (`answers.job_key`)
            stats["answered_by_job"] = dict(self.state.answered)
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        data = {"object": "list", "data": [{"id": "mock/default", "object": "model"}]}
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    def _latency(self, key: str) -> float:
        cfg = self.config
        if cfg.latency_max is not None and cfg.latency_max > cfg.latency > 0:
            # The job's own draw, so that every client (and every retry) meets the same work.
            share = int(key[8:16], 16) / 2**32
            return cfg.latency * math.exp(share * math.log(cfg.latency_max / cfg.latency))
        return cfg.latency + (self.state.rng.random() * cfg.jitter if cfg.jitter else 0.0)

    def _pick(self) -> str | None:
        cfg, rng = self.config, self.state.rng
        if cfg.script:
            action = cfg.script.pop(0)
            return None if action in (200, "ok") else str(action)
        roll = rng.random()
        for name, rate in (
            ("500", cfg.fail_rate),
            ("429", cfg.rate_429),
            ("drop", cfg.drop_rate),
            ("malformed", cfg.malformed_rate),
            ("error200", cfg.error_200_rate),
            ("cut", cfg.cut_stream_rate),
        ):
            if roll < rate:
                return name
            roll -= rate
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        st = self.state
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            response = await self._chat(request)
        finally:
            st.in_flight -= 1
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        st, cfg = self.state, self.config
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            st.statuses["400"] += 1
            return _error(400, "the body is not JSON", "invalid_request_error")
        if cfg.record:
            st.received.append(body)
            st.headers.append(dict(request.headers))
        auth = request.headers.get("Authorization", "")
        echo = f" (you sent {auth!r})" if cfg.echo_key else ""
        if cfg.api_key is not None and auth != f"Bearer {cfg.api_key}":
            st.statuses["401"] += 1
            return _error(401, f"Incorrect API key provided{echo}", "authentication_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            st.statuses["400"] += 1
            return _error(400, "'messages' is required", "invalid_request_error")
        if body.get("model") in cfg.unknown_models:
            st.statuses["404"] += 1
            return _error(404, f"The model {body['model']!r} does not exist", "model_not_found")
        if cfg.credits is not None and sum(st.answered.values()) >= cfg.credits:
            st.statuses["402"] += 1
            return _error(402, "Insufficient credits", "payment_required")
        refused = st.admission.admit(body)
        if refused is not None:
            st.statuses["429"] += 1
            if cfg.refusal_latency:
                await asyncio.sleep(cfg.refusal_latency)
            message, said = refused
            return _error(429, message, "rate_limit_error", said or None)
        # The prompt cache is read as the request arrives and written once its answer is made:
        # a request sent beside another with the same new prefix misses it.
        reading = st.prefix_cache.read(body) if st.prefix_cache is not None else None
        key = job_key(body)
        latency = self._latency(key)
        if latency:
            await asyncio.sleep(latency)
        action = self._pick()
        if action is not None and action.isdigit():
            st.statuses[action] += 1
            if action == "429":
                st.refused_jobs[key] += 1
            headers = {"Retry-After": f"{cfg.retry_after:g}"} if action in ("429", "503") else None
            kind = "rate_limit_error" if action == "429" else "server_error"
            return _error(int(action), f"mock fault {action}{echo}", kind, headers)
        if action == "timeout":
            await asyncio.sleep(3600)
        if action == "no_quota":  # OpenAI's way of saying the account has no credit left
            st.statuses["429"] += 1
            spent = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}
            return web.Response(status=429, body=orjson.dumps(spent), content_type="application/json")
        if action == "moderated":
            st.statuses["403"] += 1
            body403 = {
                "error": {
                    "code": 403,
                    "message": "Your chosen model requires moderation and your input was flagged",
                    "metadata": {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "mock"},
                }
            }
            return web.Response(status=403, body=orjson.dumps(body403), content_type="application/json")
        if action == "drop":
            st.statuses["drop"] += 1
            if st.rng.random() < 0.5:
                # The answer was made (and would be billed) but never reaches the client.
                st.answered[key] += 1
                st.lost_answers[key] += 1
            return await _drop(request)
        if action == "malformed":
            st.statuses["malformed"] += 1
            bad = (
                b'{"id": "chatcmpl-bad", "choices": [{"index": 0, "mess'
                if st.rng.random() < 0.5
                else b'{"object": "list", "data": []}'
            )
            return web.Response(body=bad, content_type="application/json")
        if action == "error200":
            st.statuses["error200"] += 1
            err = {"error": {"message": "upstream provider overloaded", "code": 502}}
            return web.Response(body=orjson.dumps(err), content_type="application/json")
        cache = (
            st.prefix_cache.write(reading) if st.prefix_cache is not None and reading is not None else None
        )
        full = completion(body, cost=cfg.cost, cache=cache)
        if action == "chatty" or (cfg.chatty_when and cfg.chatty_when in text_of(body["messages"])):
            # A model that ignores the requested format: the answer is billed all the same.
            full["choices"][0]["message"]["content"] = "Sure! Here is my verdict: it looks fine to me."
        window = st.admission.window
        headers = window.headers(cfg.clock()) if cfg.ratelimit_headers and window is not None else {}
        headers["x-request-id"] = f"req-{key}"
        if body.get("stream") is True and not cfg.ignore_stream:
            stall = key not in st.stalled and int(key[:8], 16) / 2**32 < cfg.stall_rate
            if stall:
                st.stalled.add(key)
            return await self._stream(request, body, full, headers, key, cut=action == "cut", stall=stall)
        st.statuses["200"] += 1
        st.answered[key] += 1
        st.delivered(full["usage"])
        return web.Response(body=orjson.dumps(full), content_type="application/json", headers=headers)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        full: dict[str, Any],
        headers: dict[str, str],
        key: str,
        *,
        cut: bool,
        stall: bool = False,
    ) -> web.StreamResponse:
        st = self.state
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        await response.prepare(request)
        await response.write(b": OPENROUTER PROCESSING\n\n")
        thought = 0.0
        while thought < self.config.think:  # a reasoning model, sending comments meanwhile
            await asyncio.sleep(KEEP_ALIVE)
            thought += KEEP_ALIVE
            await response.write(b": OPENROUTER PROCESSING\n\n")
        chunks = stream_chunks(full, include_usage)
        if cut:
            chunks = chunks[: max(len(chunks) // 2, 1)]
        if stall:  # the first chunk, then nothing, the connection kept open
            st.statuses["stall"] += 1
            await response.write(b"data: " + orjson.dumps(chunks[0]) + b"\n\n")
            await asyncio.sleep(3600)
        for chunk in chunks:
            if self.config.chunk_delay:
                await asyncio.sleep(self.config.chunk_delay)
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if cut:
            st.statuses["cut"] += 1
        else:
            await response.write(b"data: [DONE]\n\n")
            st.statuses["200"] += 1
            st.answered[key] += 1
            st.delivered(full["usage"])
        await response.write_eof()
        return response
