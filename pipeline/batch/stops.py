"""Why a batch run stops while it follows its batches, each a `RunStopped` that says what a
person can do; the batches go on at the provider, and the same command takes them in."""

from __future__ import annotations

from pipeline.errors import HTTPStatusError, RequestError, RunStopped
from pipeline.run.progress import duration


def not_shown(what: str, error: RequestError) -> RunStopped | None:
    """A look refused for the key or the account (401, 402, 403) stops the run; anything
    else is looked at again at the next poll."""
    status = error.status if isinstance(error, HTTPStatusError) else None
    if status not in (401, 402, 403):
        return None
    return RunStopped(
        f"the server refused to show {what} ({error.message}); the batches "
        "go on at the provider: run the same command again to resume",
        code="key_rejected",
    )


def unread(n: int, failing: float, error: RequestError) -> RunStopped:
    return RunStopped(
        f"the results of batch {n} could not be read for {duration(failing)} "
        f"({error.message}); it is kept: run the same command again to take it in",
        code="batch_api_failing",
    )


def cancelled_while_followed(n: int) -> RunStopped:
    """A person wants it stopped (pipeline cancel, or at the provider): nothing of it goes
    again in this run, which would otherwise submit at once what the cancel stopped."""
    return RunStopped(
        f"batch {n} was cancelled while this run followed it (pipeline cancel, or at the "
        "provider): what it finished is kept; run the same command again to send the rest",
        code="batch_cancelled",
    )
