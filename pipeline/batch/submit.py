"""Submitting a staged batch, exactly once whatever is killed when:

    staged   -> `creating` committed, with the time   (before anything is sent)
             -> BatchApi.submit(file, tag)             (uploads and makes the batch)
             -> its id committed: `running`
    creating -> BatchApi.find(tag, since)              (a run killed during the call above)
                found: its id committed; not found: submit (none was made, none is paid)

A refusal the run cannot outlast stops it (401, 402: resumable, the batch stays creating and
is looked for again); a refusal of the batch itself (a 400: too big, a bad model) fails its
lines, which are not sent again as they are; anything else that may pass (429, 5xx, a dropped
connection) is tried again later, through `find` first, since a 5xx may have made the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.batch.book import CREATING, STAGED, Batch, Book
from pipeline.errors import HTTPStatusError, RequestError, RunStopped
from pipeline.run.progress import duration
from pipeline.send.batchapi import BatchApi, BatchInfo, NoBatchApi

# A provider's clock and ours may differ: a batch is looked for from a little before the
# moment we noted (its tag alone tells it; `since` only narrows the search).
SKEW = 600.0
RETRY_MOST = 300.0  # seconds between two tries of a submission the provider failed


class Refused(Exception):
    """The provider refused the batch itself: its lines fail with `message`."""

    def __init__(self, message: str, error: RequestError) -> None:
        super().__init__(message)
        self.message = message
        self.error = error


def info_state(info: BatchInfo) -> dict[str, Any]:
    """A batch as last described, as the book keeps it."""
    state = info._asdict()
    state["counts"] = list(info.counts)
    state["errors"] = list(info.errors)
    del state["flaws"]  # (the errors say them; each line's own is in errors.jsonl)
    return state


async def submit(
    api: BatchApi, book: Book, batch: Batch, *, now: Callable[[], float], commit: Callable[[], bool]
) -> BatchInfo | None:
    """Make the batch (or find the one made): its info, its id committed; None when the
    book could not be committed (the run stops: the folder takes no more). Raises `Refused`,
    `RunStopped`, or a `RequestError` to try again later."""
    n, at = batch.n, batch.at
    if batch.state == STAGED or at is None:
        at = now()
        book.creating(n, at)
        if not commit():
            return None
    elif batch.state == CREATING:
        try:
            found = await api.find(
                batch.tag, since=at - SKEW, model=batch.model, lines=batch.lines, taken=book.batch_ids(but=n)
            )
        except NoBatchApi:
            raise gone() from None
        except RequestError as e:
            _raise_if_stops(e)
            raise
        if found is not None:
            return _made(book, n, found, commit)
    try:
        info = await api.submit(book.path(n), tag=batch.tag, model=batch.model, lines=batch.lines)
    except NoBatchApi:
        raise gone() from None
    except RequestError as e:
        _raise_if_stops(e)
        if not e.transient and isinstance(e, HTTPStatusError):
            raise Refused(f"the batch was refused: {e.message}", e) from None
        raise
    return _made(book, n, info, commit)


def _made(book: Book, n: int, info: BatchInfo, commit: Callable[[], bool]) -> BatchInfo | None:
    book.running(n, info.id, info_state(info))
    return info if commit() else None


def next_try(error: RequestError, *, failing: float, give_up: float) -> float | RunStopped:
    """Seconds until a submission the provider failed is tried again (doubling with how long
    it has failed, at least a second, at most RETRY_MOST, never before its Retry-After), or
    the stop once it has failed for `give_up` seconds."""
    if failing >= give_up:
        return RunStopped(
            f"the batch API kept failing for {duration(failing)} ({error.message}); the "
            "batches made so far are kept: run the same command again to resume",
            code="batch_api_failing",
        )
    wait = min(max(2 * failing, 1.0), RETRY_MOST)
    if isinstance(error, HTTPStatusError) and error.retry_after is not None:
        wait = max(wait, error.retry_after)
    return wait


def gone() -> RunStopped:
    return RunStopped(
        "the endpoint's batch API is gone (a 404 on its path): run again later, or with --tier "
        "sync; the batches made so far are kept",
        code="no_batch_api",
    )


def _raise_if_stops(error: RequestError) -> None:
    """401 and 402 (and a 429 that says no credit is left) stop the run, as on the
    synchronous path: a person must act, then run the same command to resume."""
    status = error.status if isinstance(error, HTTPStatusError) else None
    if status == 402 or error.quota_spent:
        raise RunStopped(
            f"the server says the account is out of credits ({error.message}); add credits, "
            "then run the same command again to resume",
            code="credits_exhausted",
        )
    if status in (401, 403):
        raise RunStopped(
            f"the server refused the API key ({error.message}); check the key in the environment "
            "variable named by api_key_env, then run the same command again to resume",
            code="key_rejected",
        )
