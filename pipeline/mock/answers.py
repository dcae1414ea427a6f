"""The deterministic answers of the built-in mock: the same messages always get the same
completion, with realistic `usage` (prompt tokens estimated from the text, `cost` at $0.50 /
$1.50 per million tokens) and honouring `n`, `tools`, `logprobs`, `stop`, `response_format`
(a value that satisfies the JSON schema), OpenRouter's `models` fallbacks, and streaming (the
same answer cut into chunks). With the prefix cache on (`pipeline.mock.prefixcache`), the prompt
tokens it served are reported as cached, and cost a quarter."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson

from pipeline.mock.prefixcache import Served

PRICE_PROMPT = 0.50  # dollars per million tokens
PRICE_COMPLETION = 1.50
CACHED_PRICE = 0.25  # of the prompt price, for a cached prompt token (OpenAI's older models; OpenRouter)
WRITTEN_PRICE = 1.25  # of the prompt price, for a prompt token written to the cache (Anthropic's)
ANSWER_MAX = 64  # tokens an answer may use when the request sets no max_tokens
WORDS = [
    "calm",
    "quiet",
    "river",
    "stone",
    "light",
    "morning",
    "field",
    "green",
    "warm",
    "soft",
    "open",
    "wide",
    "slow",
    "bright",
    "clear",
    "deep",
    "still",
    "gentle",
    "broad",
    "simple",
]


def job_key(body: dict[str, Any]) -> str:
    return hashlib.blake2b(orjson.dumps(body.get("messages")), digest_size=8).hexdigest()


def text_of(messages: Any) -> str:
    out = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return " ".join(out)


def estimate_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return len(text_of(messages)) // 4 + 4 * count + 3


def answer_limit(body: dict[str, Any]) -> Any:
    """The most tokens an answer to `body` may use, as the request sets it (unchecked)."""
    return body.get("max_completion_tokens") or body.get("max_tokens") or ANSWER_MAX


def _instance(schema: Any, h: int, path: str = "") -> Any:
    """A value that satisfies a (simple) JSON schema, chosen deterministically from `h`."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][h % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: _instance(v, h >> (i + 1), f"{path}.{k}") for i, (k, v) in enumerate(props.items())}
    if kind == "array":
        return [_instance(schema.get("items") or {}, h >> 3, path)]
    if kind == "boolean":
        return h % 5 == 0  # about one in five is true, like a flag
    if kind == "integer":
        return int(schema.get("minimum", 0)) + h % 5
    if kind == "number":
        low = float(schema.get("minimum", 0.0))
        high = float(schema.get("maximum", low + 1.0))
        return round(low + (high - low) * ((h % 100) / 100), 2)
    if kind == "null":
        return None
    return f"mock {path.lstrip('.') or 'text'} {h % 1000}"


def _content(body: dict[str, Any], h: int, index: int) -> tuple[str, int]:
    """The reply text for choice `index` and its token count."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        text = orjson.dumps(_instance(schema, h + index)).decode()
        return text, max(len(text) // 4, 1)
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        text = orjson.dumps({"answer": WORDS[h % len(WORDS)]}).decode()
        return text, max(len(text) // 4, 1)
    n_words = max(1, min(int(answer_limit(body)), _natural(h, index)))
    words = [WORDS[(h + i * 7 + index) % len(WORDS)] for i in range(n_words)]
    text = " ".join(words).capitalize() + "."
    stops = body.get("stop")
    for stop in stops if isinstance(stops, list) else [stops]:
        if isinstance(stop, str) and stop and stop in text:
            text = text[: text.index(stop)]
    return text, n_words


def _natural(h: int, index: int) -> int:
    """The words a plain answer would take with no limit."""
    return 12 + (h + index) % 24


def _cut(body: dict[str, Any], h: int, index: int) -> bool:
    """Whether a plain answer was cut by the request's limit (finish_reason "length"), as a
    server says of an answer that ran into max_tokens."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        return False
    limit = answer_limit(body)
    return isinstance(limit, int) and not isinstance(limit, bool) and limit < _natural(h, index)


def _tool_call(body: dict[str, Any], h: int) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    tool = tools[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tool = next((t for t in tools if (t.get("function") or {}).get("name") == wanted), tool)
    function = tool.get("function") or {}
    arguments = _instance(function.get("parameters") or {"type": "object"}, h) or {}
    return {
        "id": f"call_{h % 10**8:08d}",
        "type": "function",
        "function": {"name": function.get("name", "tool"), "arguments": orjson.dumps(arguments).decode()},
    }


def completion(body: dict[str, Any], *, cost: bool = True, cache: Served | None = None) -> dict[str, Any]:
    """The deterministic chat completion the mock answers `body` with; `cache`: what the prefix
    cache served it (None: the cache is off, and one request in four says half its prompt was
    cached, at the full price)."""
    h = int(job_key(body), 16)
    n = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    model = body.get("model")
    fallbacks = body.get("models")
    if isinstance(fallbacks, list) and fallbacks:
        # As OpenRouter does: the first model of the list that is up answers. Here a model
        # whose name says "unavailable" is down.
        candidates = ([model] if model else []) + [m for m in fallbacks if isinstance(m, str)]
        model = next((m for m in candidates if "unavailable" not in m), model)
    choices = []
    completion_tokens = 0
    tool_call = _tool_call(body, h)
    for i in range(n):
        message: dict[str, Any] = {"role": "assistant"}
        if tool_call is not None:
            message["content"] = None
            message["tool_calls"] = [tool_call]
            completion_tokens += 12
            reason = "tool_calls"
        else:
            text, tokens = _content(body, h, i)
            message["content"] = text
            completion_tokens += tokens
            reason = "length" if _cut(body, h, i) else "stop"
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": reason}
        if body.get("logprobs") and message.get("content"):
            top = body.get("top_logprobs") or 0
            choice["logprobs"] = {
                "content": [
                    {
                        "token": word,
                        "logprob": -0.01 * (j + 1),
                        "top_logprobs": [{"token": word, "logprob": -0.01 * (j + 1)}] * min(int(top), 1),
                    }
                    for j, word in enumerate(message["content"].split()[:8])
                ]
            }
        choices.append(choice)
    prompt_tokens = estimate_tokens(body)
    if cache is None:
        details = {"cached_tokens": prompt_tokens // 2 if h % 4 == 0 else 0}
        prompt_price = prompt_tokens * PRICE_PROMPT
    else:
        details = {"cached_tokens": cache.cached, "cache_write_tokens": cache.written}
        fresh = prompt_tokens - cache.cached - cache.written
        prompt_price = (fresh + cache.cached * CACHED_PRICE + cache.written * WRITTEN_PRICE) * PRICE_PROMPT
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    if cost:
        usage["cost"] = round((prompt_price + completion_tokens * PRICE_COMPLETION) / 1e6, 10)
    return {
        "id": f"chatcmpl-mock{h % 10**12:012d}",
        "object": "chat.completion",
        "created": 1764000000,
        "model": model or "mock/default",
        "provider": "mock",
        "system_fingerprint": f"fp_mock_{body.get('seed', 0)}",
        "choices": choices,
        "usage": usage,
    }


def stream_chunks(full: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    base = {k: full[k] for k in ("id", "created", "model", "provider")} | {"object": "chat.completion.chunk"}
    chunks = []
    for choice in full["choices"]:
        i = choice["index"]
        message = choice["message"]
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        )
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            args = call["function"]["arguments"]
            half = len(args) // 2
            first = {
                "index": 0,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": args[:half]},
            }
            chunks.append(
                {**base, "choices": [{"index": i, "delta": {"tool_calls": [first]}, "finish_reason": None}]}
            )
            rest = {"index": 0, "function": {"arguments": args[half:]}}
            chunks.append(
                {**base, "choices": [{"index": i, "delta": {"tool_calls": [rest]}, "finish_reason": None}]}
            )
        else:
            words = (message.get("content") or "").split(" ")
            step = max(1, math.ceil(len(words) / 4))
            for j in range(0, len(words), step):
                piece = " ".join(words[j : j + step]) + (" " if j + step < len(words) else "")
                delta: dict[str, Any] = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                if choice.get("logprobs") and j == 0:
                    delta["logprobs"] = choice["logprobs"]
                chunks.append({**base, "choices": [delta]})
        chunks.append(
            {**base, "choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}]}
        )
    if include_usage:
        chunks.append({**base, "choices": [], "usage": full["usage"]})
    return chunks
