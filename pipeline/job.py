"""The nouns that flow through a run: a request in, and exactly one outcome out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.input.images import Pending


# Plain classes with __slots__, not slots dataclasses: each of those cost about half a
# millisecond of every run's start to build (its methods generated and compiled, its class
# made twice), and these four are all a request needs.


class Request:
    """One input line, ready to send."""

    __slots__ = (
        "bounded",
        "charged_prompt",
        "custom_id",
        "images",
        "line",
        "max_completion_tokens",
        "metadata",
        "model",
        "payload",
        "prefix",
        "prompt_tokens",
        "stream",
    )

    def __init__(
        self,
        custom_id: str,
        line: int,
        payload: bytes,  # the body, serialised once and sent as is on every attempt
        metadata: Any = None,
        model: str = "",
        stream: bool = False,
        prompt_tokens: int = 0,  # estimate, for budgets
        charged_prompt: int = 0,  # the prompt at four characters a token, as a limiter may count it
        max_completion_tokens: int = 0,  # worst case over all choices (`max_tokens` times `n`)
        bounded: bool = True,  # the request sets max_tokens (else the worst case is a guess)
        images: list[Pending] | None = None,  # local images the payload's markers stand for, unread
        prefix: str | None = None,  # its long prefix's key, to be sent beside its kin (`input.prefix`)
    ) -> None:
        self.custom_id, self.line, self.payload, self.metadata = custom_id, line, payload, metadata
        self.prefix = prefix
        self.model, self.stream, self.prompt_tokens = model, stream, prompt_tokens
        self.charged_prompt, self.max_completion_tokens = charged_prompt, max_completion_tokens
        self.bounded, self.images = bounded, images

    @property
    def token_estimate(self) -> int:
        """What a token limit may count for it: the larger of the two counts of its prompt."""
        return max(self.prompt_tokens, self.charged_prompt) + self.max_completion_tokens


class SentNow(Request):
    """A line a batch left undone, sent as a request (`--then sync`): bought at the
    synchronous price, where the run's other answers are at the batch price. Its attempts
    count on from the tries its batches spent (`--max-attempts` bounds them all, and the
    verdict's own bound the answers that broke it)."""

    __slots__ = ("broke", "spent")

    def __init__(
        self,
        custom_id: str,
        line: int,
        payload: bytes,
        metadata: Any,
        model: str,
        stream: bool,
        *,
        spent: int = 0,  # tries spent in batches
        broke: int = 0,  # of those, answers that broke the verdict
    ) -> None:
        super().__init__(custom_id, line, payload, metadata, model, stream)
        self.spent, self.broke = spent, broke


class Reply:
    """A chat completion as it came back from the server."""

    __slots__ = ("body", "latency", "limits", "raw", "request_id", "status", "ttft")

    def __init__(
        self,
        body: dict[str, Any],
        raw: bytes | None,  # the body's bytes when they can be copied to the output untouched
        status: int = 200,
        request_id: str | None = None,
        latency: float = 0.0,
        ttft: float | None = None,  # time to first token, streamed requests only
        limits: dict[str, str] | None = None,  # the x-ratelimit-* headers, when the server sent any
    ) -> None:
        self.body, self.raw, self.status, self.request_id = body, raw, status, request_id
        self.latency, self.ttft, self.limits = latency, ttft, limits


class Success:
    __slots__ = ("attempts", "bought", "label", "parsed", "reply", "request", "reused")

    def __init__(
        self,
        request: Request,
        reply: Reply,
        attempts: int,
        parsed: Any = None,  # a verdict checked against the job's schema
        label: str | None = None,  # how the report counts that verdict ("flagged: true")
        reused: bool = False,  # the answer cache's, or another request's in flight: not sent, not paid
        bought: float | None = None,  # a reused answer's cost when bought, as the cache kept it
    ) -> None:
        self.request, self.reply, self.attempts, self.parsed, self.label = (
            request,
            reply,
            attempts,
            parsed,
            label,
        )
        self.reused, self.bought = reused, bought


class Failure:
    """A request that ended failed, or an input line that could not become one."""

    __slots__ = (
        "attempts",
        "body",
        "code",
        "custom_id",
        "extra",
        "line",
        "message",
        "metadata",
        "model",
        "request_id",
        "status",
        "unsent",
    )

    def __init__(
        self,
        line: int,
        code: str,
        message: str,
        custom_id: str | None = None,
        status: int | None = None,
        body: Any = None,
        request_id: str | None = None,
        attempts: int = 0,
        metadata: Any = None,
        model: str | None = None,
        extra: dict[str, Any] | None = None,
        unsent: bool = False,  # a request failed without being sent (its model is gone): not the input's fault
    ) -> None:
        self.line, self.code, self.message, self.custom_id = line, code, message, custom_id
        self.status, self.body, self.request_id, self.attempts = status, body, request_id, attempts
        self.metadata, self.model, self.unsent = metadata, model, unsent
        self.extra: dict[str, Any] = {} if extra is None else extra

    @property
    def is_input_error(self) -> bool:
        return self.attempts == 0 and not self.unsent


Outcome = Success | Failure
