"""Every way a run or a request can fail, as one small tree.

    PipelineError
    ├── SettingsError          the command line or job file is wrong; nothing was sent (exit 2)
    ├── InputError             one input line cannot become a request (a line in errors.jsonl)
    ├── RunStopped             the run must stop for a person: key rejected, credits gone,
    │                          budget reached, endpoint unreachable (exit 3, resumable)
    └── RequestError           one attempt at one request failed
        ├── HTTPStatusError    a non-2xx answer; carries the status and the server's error body
        ├── ProviderError      an `error` object inside a 200 body or a stream chunk,
        │                      or a choice that finished with reason "error"
        ├── MalformedResponse  a body that is not a chat completion; a stream cut short
        │   └── EmptyAnswer    a chat completion without an answer: no choices, or a choice
        │                      with no content, tool call or refusal and no finish_reason
        ├── InvalidOutput      a completion whose content breaks the job's contract
        │                      (a verdict that is not valid JSON for its schema)
        ├── RequestTimeout     no complete answer within the per-request timeout
        └── ConnectionDropped  the connection failed or closed before the answer was whole
            └── CannotConnect  no connection was made: the request never reached the server

Errors are mapped where the answer arrives (`client`, `verdict`), with the meaning of each
status given by `pipeline.send.status`; everything above them handles only this tree. Each carries what the retry policy and the error file need:
`code` (a short stable name), `status`, `retry_after` and the server's `body` (whose `usage`,
when it reports any, counts as spent: an answer thrown away is billed all the same).
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""


class SettingsError(PipelineError):
    """The command line, the job file or the environment is wrong: nothing was sent."""


class FolderBusy(SettingsError):
    """Another run holds the output folder's lock."""


class InputError(PipelineError):
    """An input line that cannot become a request; `field` names the part at fault."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid_input"):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
        self.metadata: Any = None  # the record, when the line was a record
        self.custom_id: str | None = None  # the id the line named, when it named one


class RunStopped(PipelineError):
    """The run stopped early for a reason a person must deal with; it can be resumed."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class RequestError(PipelineError):
    """One attempt at one request failed."""

    code = "request_error"
    transient = True
    refusal = False  # a 429: the server asks for later, and no attempt is spent on it
    outage = False  # failed while the endpoint as a whole was down: no attempt spent either
    quota_spent = False  # a 429 that says the account has no credit left

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        body: Any = None,
        request_id: str | None = None,
        limits: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.request_id = request_id
        self.limits = limits  # the x-ratelimit-* headers, when the server sent any


class HTTPStatusError(RequestError):
    """Built by `pipeline.send.status.http_error`, which says what the status means."""

    code = "http_error"


class ProviderError(RequestError):
    """Built by `pipeline.send.status.provider_error`, from the upstream's code."""

    code = "provider_error"

    def __init__(self, message: str, *, provider_code: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.provider_code = provider_code


class MalformedResponse(RequestError):
    code = "malformed_response"


class EmptyAnswer(MalformedResponse):
    """A 200 that holds no answer (a gateway's reply while a model starts cold): retried, and
    its usage, when it reports any, counted as spent."""

    code = "empty_answer"


class InvalidOutput(RequestError):
    code = "invalid_output"


class RequestTimeout(RequestError):
    code = "timeout"


class ConnectionDropped(RequestError):
    code = "connection_error"


class CannotConnect(ConnectionDropped):
    """Refused, unresolved, or not connected in time: whatever the endpoint's trouble, it is
    not the request's (`pipeline.pace.outage` needs no other request failing to say so)."""
