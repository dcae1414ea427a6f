"""Assemble a streamed chat completion (server-sent events) into one `chat.completion` body.

Pure functions of the bytes received, so the client only moves bytes and this module can be
tested on its own. Deltas are joined per choice: strings are concatenated (content, refusal,
reasoning), lists extended (logprobs, reasoning details), tool calls joined by their index.
A stream is whole only when every choice has a finish_reason and `[DONE]` arrived (so every
choice is an answer by `status.empty_answer`'s rule), and an answer only when it has a choice.

`assemble` is what the client calls: whatever the stream holds, it returns a completion or
raises an error of `pipeline.errors` (a stream cut short or of shapes no server should send
is a `MalformedResponse`; one without an answer an `EmptyAnswer`; an error the stream
carried, a `ProviderError`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any

import orjson

from pipeline.errors import EmptyAnswer, MalformedResponse, ProviderError, RequestError
from pipeline.input.jsonl import too_deep
from pipeline.quote import brief, quote
from pipeline.send.status import provider_error

DONE = b"[DONE]"


MAX_INDEX = 128  # choices or tool calls in one answer; beyond it, a server gone wrong


def _index(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_INDEX:
        raise MalformedResponse(f"a streamed chunk has an index that is not a small number: {quote(value)}")
    return value


def _merge_tool_calls(into: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = _index(delta.get("index", len(into)))
        while len(into) <= index:
            into.append(
                {
                    "index": len(into),
                    "id": None,
                    "type": "function",
                    "function": {"name": "", "arguments": ""},
                }
            )
        call = into[index]
        for key, value in delta.items():
            if key == "function" and isinstance(value, dict):
                function = call["function"] if isinstance(call.get("function"), dict) else {}
                call["function"] = function
                for fkey, fvalue in value.items():
                    if isinstance(fvalue, str) and isinstance(function.get(fkey), str):
                        function[fkey] += fvalue
                    else:
                        function[fkey] = fvalue
            elif key != "index" and value is not None:
                call[key] = value


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls" and isinstance(value, list):
            _merge_tool_calls(message.setdefault("tool_calls", []), value)
        elif key == "role":
            message["role"] = value
        else:
            old = message.get(key)
            if isinstance(value, str) and isinstance(old, str):
                message[key] = old + value
            elif isinstance(value, list) and isinstance(old, list):
                old.extend(value)
            else:
                message[key] = value


class StreamAssembler:
    """Feed it SSE lines; ask it for the completion when the stream ends."""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.started = False  # a first token (or tool call) has arrived
        self._data: list[bytes] = []

    def feed_line(self, line: bytes) -> bool:
        """Take one line of the event stream; True when it completed the first token."""
        line = line.rstrip(b"\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return False  # a comment, such as ": OPENROUTER PROCESSING"
        field, _, value = line.partition(b":")
        if field == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return False

    def close(self) -> None:
        self._dispatch()

    def _dispatch(self) -> bool:
        if not self._data:
            return False
        data = b"\n".join(self._data)
        self._data = []
        if data.strip() == DONE:
            self.done = True
            return False
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedResponse(f"a streamed chunk is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise MalformedResponse("a streamed chunk is not a JSON object")
        if too_deep(data, chunk):
            # An error it carried would go whole into errors.jsonl, a line no one could write
            # (RecursionError, exit 70); an answer, into results.jsonl, likewise. The assembled
            # answer nests no deeper than its deepest chunk (each value sits as deep in it as in
            # its chunk; the frame around them is 7 levels), so this check holds for it too.
            raise MalformedResponse("a streamed chunk is nested too deep to be kept")
        return self.feed(chunk)

    def feed(self, chunk: dict[str, Any]) -> bool:
        error = chunk.get("error")
        if error:
            raise _provider_error(error, "the stream carried an error", chunk)
        first = False
        for key, value in chunk.items():
            if key not in ("choices", "usage", "object") and key not in self.top:
                self.top[key] = value
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index", 0))
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = {
                    "index": index,
                    "message": {"role": "assistant"},
                    "finish_reason": None,
                }
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if not self.started and (
                    delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
                ):
                    self.started = first = True
                _merge_delta(state["message"], delta)
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                merged = state.get("logprobs")
                if not isinstance(merged, dict):
                    merged = state["logprobs"] = {}
                for key, value in logprobs.items():
                    earlier = merged.get(key)
                    if isinstance(value, list) and isinstance(earlier, list):
                        earlier.extend(value)
                    elif value is not None or key not in merged:
                        merged[key] = list(value) if isinstance(value, list) else value
            reason = choice.get("finish_reason")
            if reason:
                if reason == "error":
                    raise _provider_error(choice.get("error") or {}, "a choice finished with an error", chunk)
                state["finish_reason"] = reason
        return first

    def completion(self) -> dict[str, Any]:
        """The assembled body; a stream cut short is a `MalformedResponse`, one without an
        answer an `EmptyAnswer`. Either carries what arrived when the stream reported usage,
        so that what was billed is counted."""
        self.close()
        body: dict[str, Any] = {**self.top, "object": "chat.completion"}
        body["choices"] = [self.choices[i] for i in sorted(self.choices)]
        if self.usage is not None:
            body["usage"] = self.usage
        arrived = body if self.usage is not None else None
        if not self.done:
            raise MalformedResponse("the stream ended before [DONE]; the reply is incomplete", body=arrived)
        if not self.choices:
            raise EmptyAnswer("the stream ended without any choice", body=arrived)
        unfinished = [i for i, c in self.choices.items() if not c["finish_reason"]]
        if unfinished:
            raise MalformedResponse(
                f"the stream ended without a finish_reason for choice {unfinished[0]}", body=arrived
            )
        return body


def _provider_error(error: Any, default: str, body: Any) -> ProviderError:
    if isinstance(error, dict):
        message = brief(error.get("message") or default)
        code = error.get("code")
    else:
        message, code = brief(error), None
    return provider_error(f"provider error: {message}", code=code, body=body)


async def assemble(
    chunks: AsyncIterable[bytes], *, first_token: Callable[[], None] | None = None
) -> dict[str, Any]:
    """The completion a stream carries, from its bytes in the pieces they arrive in, calling
    `first_token` when the first token arrives. Lines are split here, with no bound on their
    length: aiohttp's own reading by lines raised `LineTooLong` (not one of its client errors)
    past twice its buffer, and a chunk holding an image is megabytes on one line. What
    reading raises (a dropped connection, a timeout) goes through for the client to map."""
    assembler = StreamAssembler()
    partial: list[bytes] = []  # the start of a line whose end has not arrived
    try:
        async for chunk in chunks:
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                partial.append(chunk[start : end + 1])
                line = b"".join(partial)
                partial.clear()
                if assembler.feed_line(line) and first_token is not None:
                    first_token()
                start = end + 1
            if start < len(chunk):
                partial.append(chunk[start:])
        if partial:
            assembler.feed_line(b"".join(partial))  # the last line, without its end
        return assembler.completion()
    except RequestError:
        raise
    except ValueError as e:
        raise MalformedResponse(f"a streamed answer could not be read: {brief(str(e))}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        # Chunks of shapes no server should send (an index that is a string...).
        raise MalformedResponse(
            f"a streamed chunk is not a chat completion chunk: {type(e).__name__}: {brief(str(e))}"
        ) from None
