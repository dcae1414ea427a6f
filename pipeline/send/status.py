"""What an answer that is not a result means for the run: the one place that says it.

    429              "later": the request waits as told and goes again; it spends no attempt.
                     Except: `insufficient_quota` (no credit left) stops the run like a 402,
                     and "request too large" fails the request (no waiting lets it through).
    408 409 425      transient: retried, each retry spending an attempt
    500 502 504      transient; when every request out fails so (or with a 503, a connection
                     refused or reset, a timeout), nothing answering between, the endpoint is
                     down: no attempt is spent while it is (`pipeline.pace.outage`)
    503              transient, and the server says it is overloaded: counted like a refusal
    401, 402         stop the run at once (key refused; no credit), resumable (exit 3)
    403              a streak of them, nothing succeeding between, stops the run (key refused);
                     one that refuses the content (a moderation flag) fails that request only
    404              fails the request when it names a model not served (later lines of that
                     model fail unsent); a 404 that says nothing of a model, when nothing says
                     the path is right (an answer, GET /models), stops the run: the URL is
                     wrong (`pipeline.send.notfound`)
    other 4xx        the request is wrong: it fails, with the server's message
    an error in a 200  read as its numeric code where it gives one (an upstream 429 is "later")
    an empty 200     no choices, or a choice with nothing in it and no finish_reason (a gateway
                     while a model starts cold): transient, each retry spending an attempt

Errors are built here from what the client read, so that every error carries its meaning
(`transient`, `refusal`, `quota_spent`) and the worker, the retry policy and the rate finder
only read it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pipeline.errors import (
    ConnectionDropped,
    EmptyAnswer,
    HTTPStatusError,
    MalformedResponse,
    ProviderError,
    RequestError,
    RequestTimeout,
    RunStopped,
)
from pipeline.send.notfound import NotFound

TRANSIENT = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
OVERLOADED = 503
# A 403 can be about one request (a moderation refusal) or about the key; only a streak of
# them, with nothing succeeding in between, says the key is refused.
STREAK = 5


def http_error(
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
    body: Any = None,
    request_id: str | None = None,
    limits: dict[str, str] | None = None,
) -> HTTPStatusError:
    error = HTTPStatusError(
        f"HTTP {status}: {message}",
        status=status,
        retry_after=retry_after,
        body=body,
        request_id=request_id,
        limits=limits,
    )
    error.transient = status in TRANSIENT
    if status == 429:
        error.quota_spent = _says(body, "insufficient_quota")
        too_large = "request too large" in message.lower()
        error.refusal = not (error.quota_spent or too_large)
        error.transient = error.refusal  # no waiting helps the others
    return error


def provider_error(message: str, *, code: Any, body: Any, request_id: str | None = None) -> ProviderError:
    """An `error` object inside a 200 body or a stream chunk, as its upstream code says."""
    error = ProviderError(message, provider_code=code, body=body, request_id=request_id)
    if isinstance(code, int) and 400 <= code < 500:
        # A client error (400, 404...) will not get better by asking again; everything else
        # from upstream (5xx, overloads, timeouts, no code at all) may.
        error.transient = code in TRANSIENT
    error.refusal = code == 429  # "later", from upstream
    return error


def empty_answer(body: dict[str, Any], *, request_id: str | None = None) -> EmptyAnswer | None:
    """A chat completion that holds no answer: no choices, or a choice that neither says
    why it ended nor holds anything. One empty choice of n makes the answer as incomplete as
    a stream that ends without one choice's finish_reason: it is asked for again, whole."""
    choices = body.get("choices")
    if not choices:
        return EmptyAnswer("the answer is empty: no choices", body=body, request_id=request_id)
    for index, choice in enumerate(choices):
        if isinstance(choice, dict) and not _answers(choice):
            return EmptyAnswer(
                f"the answer is empty: choice {index} has no content, tool call or refusal, and no "
                "finish_reason",
                body=body,
                request_id=request_id,
            )
    return None


def _answers(choice: dict[str, Any]) -> bool:
    """Whether a choice is an answer: it says why it ended (content "" with "stop" is one,
    and so is nothing with "length": a reasoning model that spent every token thinking), or
    it holds something (content, a tool call, a refusal, audio, images; a completion's text)."""
    if choice.get("finish_reason") or choice.get("text"):
        return True
    message = choice.get("message")
    if not isinstance(message, dict):
        return False
    return any(
        message.get(key) for key in ("content", "tool_calls", "function_call", "refusal", "audio", "images")
    )


def _says(body: Any, code: str) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and code in (str(error.get("code")), str(error.get("type")))


def _refuses_content(body: Any) -> bool:
    """A 403 that refuses the request's content (OpenRouter's moderation: `flagged_input`
    and `reasons` in the error's metadata), not the key."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    metadata = error.get("metadata")
    if isinstance(metadata, dict) and ("flagged_input" in metadata or "reasons" in metadata):
        return True
    message = str(error.get("message", "")).lower()
    return "moderation" in message or "flagged" in message


class Signal(Enum):
    """What an attempt that failed tells the rate finder about the endpoint."""

    PUSHBACK = "the server asks for later: full, or overloaded"
    FAILURE = "the endpoint failed: an outage, if most do"
    ANSWERED = "the endpoint answered; the request, or that one answer, was at fault"


def endpoint_failed(error: RequestError) -> bool:
    """The endpoint itself failed the request: no connection, no answer in time, a 5xx. When
    every request out fails so, it is down (`pipeline.pace.outage`). A 200 that is empty,
    malformed or holds an error is an answer: the endpoint is up, that answer was wrong."""
    if isinstance(error, ConnectionDropped | RequestTimeout):
        return True
    return isinstance(error, HTTPStatusError) and error.status is not None and error.status >= 500


def signal(error: RequestError) -> Signal:
    if error.refusal or (isinstance(error, HTTPStatusError) and error.status == OVERLOADED):
        return Signal.PUSHBACK
    return Signal.FAILURE if endpoint_failed(error) else Signal.ANSWERED


def answer_key(error: RequestError) -> str:
    """How usage.json counts the answer: its status, or the error's code."""
    return str(error.status) if isinstance(error, HTTPStatusError) else error.code


class Judge:
    """Whether a request's final error is its own, or the whole run's: then the run stops."""

    def __init__(self, not_found: NotFound) -> None:
        self.not_found = not_found  # what the 404s say: a model gone, or the URL wrong
        self.forbidden = 0  # 403s in a row

    def success(self) -> None:
        self.forbidden = 0
        self.not_found.reached()

    def failed(self, error: RequestError) -> None:
        """An attempt failed: a 200 that held no result still says the path is right."""
        if isinstance(error, MalformedResponse | ProviderError):
            self.not_found.reached()

    def ended(self) -> None:
        """A request ended (`Control.in_hand` is down by one)."""
        self.not_found.ended()

    def gone(self, model: str) -> str | None:
        """What the server said of `model` when it does not serve it: its lines fail unsent."""
        return self.not_found.gone.get(model) if self.not_found.gone else None

    async def stops_run(self, error: RequestError, model: str) -> RunStopped | None:
        """Raises `Undecided` when the run stopped before a 404 could be judged."""
        status = error.status if isinstance(error, HTTPStatusError) else None
        if error.quota_spent or status == 402:
            return RunStopped(
                f"the server says the account is out of credits ({error.message}); "
                "add credits, then run the same command again to resume",
                code="credits_exhausted",
            )
        if status == 403 and not _refuses_content(error.body):
            self.forbidden += 1
        if status == 401 or (status == 403 and self.forbidden >= STREAK):
            return RunStopped(
                f"the server refused the API key ({error.message}); check the key in the "
                "environment variable named by api_key_env, then run the same command again to resume",
                code="key_rejected",
            )
        if status == 404 and isinstance(error, HTTPStatusError):
            return await self.not_found.judge(error, model)
        return None
