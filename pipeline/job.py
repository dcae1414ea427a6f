"""The nouns that flow through a run: a request in, and exactly one outcome out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.input.images import Pending


@dataclass(slots=True)
class Request:
    """One input line, ready to send."""

    custom_id: str
    line: int
    payload: bytes  # the body, serialised once and sent as is on every attempt
    metadata: Any = None
    model: str = ""
    stream: bool = False
    prompt_tokens: int = 0  # estimate, for budgets
    charged_prompt: int = 0  # the prompt at four characters a token, as a limiter may count it
    max_completion_tokens: int = 0  # worst case over all choices (`max_tokens` times `n`)
    bounded: bool = True  # the request sets max_tokens (else the worst case is a guess)
    images: list[Pending] | None = None  # local images the payload's markers stand for, unread

    @property
    def token_estimate(self) -> int:
        """What a token limit may count for it: the larger of the two counts of its prompt."""
        return max(self.prompt_tokens, self.charged_prompt) + self.max_completion_tokens


@dataclass(slots=True)
class Reply:
    """A chat completion as it came back from the server."""

    body: dict[str, Any]
    raw: bytes | None  # the body's bytes when they can be copied to the output untouched
    status: int = 200
    request_id: str | None = None
    latency: float = 0.0
    ttft: float | None = None  # time to first token, streamed requests only
    limits: dict[str, str] | None = None  # the x-ratelimit-* headers, when the server sent any


@dataclass(slots=True)
class Success:
    request: Request
    reply: Reply
    attempts: int
    parsed: Any = None  # a verdict checked against the job's schema
    label: str | None = None  # how the report counts that verdict ("flagged: true")


@dataclass(slots=True)
class Failure:
    """A request that ended failed, or an input line that could not become one."""

    line: int
    code: str
    message: str
    custom_id: str | None = None
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    attempts: int = 0
    metadata: Any = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unsent: bool = False  # a request failed without being sent (its model is gone): not the input's fault

    @property
    def is_input_error(self) -> bool:
        return self.attempts == 0 and not self.unsent


Outcome = Success | Failure
