"""What a request body must be before it is sent: what the server would refuse for sure is an
input error naming the field; every other parameter passes through untouched. And the
parameters an OpenAI-compatible server knows, so that a job file's near miss is named."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import InputError
from pipeline.quote import quote

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "seed")
_NUMBER_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_BOOL_FIELDS = ("stream", "logprobs")
# (made once: `str | list` written in a check makes the union at every call, and every line
# read is checked)
_CONTENT = str | list  # type: ignore[type-arg]  # (a check of the type, not a list of anything)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else type(value).__name__


def _valid_message(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("role"), str):
        return False
    content = value.get("content")
    return content is None or isinstance(content, _CONTENT)


def _valid_messages(value: Any) -> bool:
    # (map, not a generator: every line read comes here)
    return isinstance(value, list) and bool(value) and all(map(_valid_message, value))


# What each checked field may be, by its exact type: what JSON (and TOML) reads, one look at
# a set where a check was a call. A subclass (bool, for an int) is left to `check_body`'s
# checks, which say what is wrong, if anything. A field set to null passes, but messages.
FIELD_TYPES: dict[str, frozenset[type]] = {
    "model": frozenset({str}),
    **dict.fromkeys(_INT_FIELDS, frozenset({int})),
    **dict.fromkeys(_NUMBER_FIELDS, frozenset({int, float})),
    **dict.fromkeys(_BOOL_FIELDS, frozenset({bool})),
    "stream_options": frozenset({dict}),
}


def _fine(body: Mapping[str, Any]) -> bool:
    """Whether `check_body` finds nothing wrong (False: it looks closer). Most bodies are
    right: this looks at the few fields a body holds, where the checks that say what is
    wrong and where look up every field they know, a dozen."""
    for key, value in body.items():
        if key == "messages":
            if not _valid_messages(value):
                return False
            continue
        types = FIELD_TYPES.get(key)
        if types is not None and value is not None and type(value) not in types:
            return False
    return "messages" in body


def check_body(body: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse what the server would refuse for sure, and say which field and why."""
    if _fine(body):
        return
    messages = body.get("messages")
    if messages is None:
        raise InputError(
            f"no '{prefix}messages': each request needs a list of messages", field=f"{prefix}messages"
        )
    if not isinstance(messages, list) or not messages:
        what = "empty" if messages == [] else type_name(messages)
        raise InputError(
            f"'{prefix}messages' is {what}; it must be a non-empty list of {{role, content}} objects",
            field=f"{prefix}messages",
        )
    for i, message in enumerate(messages):
        where = f"{prefix}messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(
                f"'{where}' is {type_name(message)}; it must be an object with a role", field=where
            )
        if not isinstance(message.get("role"), str):
            raise InputError(f"'{where}.role' is missing or not a string", field=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InputError(
                f"'{where}.content' is {type_name(content)}; it must be a string or a list of parts",
                field=f"{where}.content",
            )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"'{prefix}model' must be a string, not {type_name(model)}", field=f"{prefix}model")
    for key in _INT_FIELDS:
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InputError(
                f"'{prefix}{key}' must be a whole number, not {quote(value)}", field=f"{prefix}{key}"
            )
    for key in _NUMBER_FIELDS:
        value = body.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InputError(f"'{prefix}{key}' must be a number, not {quote(value)}", field=f"{prefix}{key}")
    for key in _BOOL_FIELDS:
        value = body.get(key)
        if value is not None and not isinstance(value, bool):
            raise InputError(
                f"'{prefix}{key}' must be true or false, not {quote(value)}", field=f"{prefix}{key}"
            )
    # (the reader adds include_usage to it, and a server refuses any other kind anyway)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InputError(
            f"'{prefix}stream_options' must be an object, not {quote(options)}",
            field=f"{prefix}stream_options",
        )


# The request parameters of OpenAI's chat completions and of the routers that speak it
# (OpenRouter's among them). Unknown keys still pass through: a server may know more.
KNOWN_PARAMETERS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop",
        "max_tokens", "max_completion_tokens", "frequency_penalty", "presence_penalty",
        "logit_bias", "logprobs", "top_logprobs", "seed", "user", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "reasoning_effort", "metadata", "store",
        "modalities", "audio", "prediction", "service_tier", "web_search_options", "verbosity",
        "prompt_cache_key", "safety_identifier", "functions", "function_call",
        # OpenRouter
        "models", "provider", "transforms", "reasoning", "usage", "plugins", "route", "top_k",
        "min_p", "top_a", "repetition_penalty", "structured_outputs",
    }
)  # fmt: skip


def _one_edit(a: str, b: str) -> bool:
    """Whether `b` is `a` with one letter added, dropped, changed, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
    return short[i:] == long[i + 1 :]


def near_parameter(key: str) -> str | None:
    """The known parameter `key` is most likely a typo of (one edit away), if it is not one."""
    if key in KNOWN_PARAMETERS:
        return None
    return next((known for known in sorted(KNOWN_PARAMETERS) if _one_edit(key, known)), None)
