"""What a provider's batch API is to the rest of the tool, whatever shape it speaks.

Two shapes exist (`send.batchfiles`: OpenAI's, a JSONL file uploaded then a batch made of it;
`send.batchinline`: the inline one, a `requests` array posted with one `model`). Both are
seen through `BatchApi`; both give their results back as lines of OpenAI's batch output shape
(`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`), so what
takes them in (`pipeline.batch`) reads one shape.

A batch is found again after a crash by its tag: a name of ours (`pipeline-<folder>-<n>`)
sent in the batch's metadata (and in the uploaded file's name), unique to one batch of one
folder, so that a run killed between creating a batch and noting its id attaches to it
instead of paying for it twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any, NamedTuple, Protocol

# The states a batch moves through (OpenAI's names; the inline shape's are the same).
RUNNING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
TAG_KEY = "pipeline_tag"  # the metadata key that carries a batch's tag


# A result line: its bytes, or its object parsed already (`BatchApi.results`).
ResultLine = bytes | dict[str, Any]


class BatchCounts(NamedTuple):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Flaw(NamedTuple):
    """One reason a batch failed validation, as the provider gave it: OpenAI's `errors.data[]`
    item (`line`: of the uploaded file, 1 for its first), or the inline shape's one
    `error.message` (no line)."""

    code: str | None
    message: str
    param: str | None = None
    line: int | None = None


class BatchInfo(NamedTuple):
    """A batch as the provider last described it."""

    id: str
    status: str  # one of RUNNING or ENDED; anything else is kept as said, and treated as running
    counts: BatchCounts = BatchCounts()
    tag: str | None = None  # metadata[TAG_KEY], when the provider keeps metadata
    model: str | None = None  # the inline shape's one model
    created_at: float | None = None  # seconds since the epoch, as the provider says
    input_file: str | None = None  # files shape: the uploaded requests
    output_file: str | None = None  # files shape: where the answers are
    error_file: str | None = None  # files shape: where the failed lines are
    errors: tuple[str, ...] = ()  # why a batch failed validation, one line each (with the line number)
    flaws: tuple[Flaw, ...] = ()  # the same, each as given: which line, what code, what param

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class BatchPage(NamedTuple):
    """One page of the endpoint's list of batches, newest first (`BatchApi.page`)."""

    batches: tuple[BatchInfo, ...]  # those the list describes as fully as `get` would
    after: str | None  # the next page's cursor; None: the list ends here
    oldest: float | None  # when the page's last batch was made (epoch seconds), where said


class NoBatchApi(Exception):
    """The endpoint has no batch API (a 404 on its files or batches path)."""


class BatchApi(Protocol):
    """One endpoint's batch API. Every call raises the error tree's `RequestError`s
    (`pipeline.errors`: an `HTTPStatusError` for 401, 402, a 429 or 5xx that retries did not
    outlast, a dropped connection...) and `NoBatchApi` for a 404 on the path."""

    shape: str  # "files" or "inline"
    max_lines: int  # requests a batch may hold
    max_bytes: int  # bytes of a batch's requests (the uploaded file, or the posted array)

    async def check(self) -> None:
        """Raise `NoBatchApi` when the endpoint has none; send nothing that costs."""

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        """Make a batch of the staged file (OpenAI batch input lines, one model), tagged."""

    async def find(
        self,
        tag: str,
        *,
        since: float,
        model: str | None = None,
        lines: int | None = None,
        taken: Collection[str] = (),
    ) -> BatchInfo | None:
        """The batch made with `tag` no earlier than `since` (epoch seconds), or None. Where
        the provider keeps no metadata (OpenRouter), the batch of `model` with `lines`
        requests made since then, but for those `taken` (the ids the caller holds for its
        other batches: a folder's batches are often alike in model and size) and those this
        client made or found for another tag; two such raise `RunStopped` (never guessed
        between)."""

    async def get(self, batch_id: str) -> BatchInfo: ...

    async def page(self, after: str | None = None) -> BatchPage | None:
        """A page of the endpoint's batches, newest first, from `after` (a cursor of the page
        before): one call, that looks at many running batches at once (a follower of twenty
        would otherwise look at each every twenty seconds). A batch the list describes less
        fully than `get` (an ended one without what taking it in needs) is left out, and is
        looked at alone. None: this API lists nothing usable (each batch is looked at alone)."""
        return None

    async def cancel(self, batch_id: str) -> BatchInfo: ...

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        """Delete what a batch taken in left at the provider (the user's prompts and answers):
        at the files shape its `files` (input, output, error: `DELETE {base}/files/{id}`), at
        the inline shape the batch itself, with its requests and results (OpenRouter's
        `DELETE {base}/batches/{id}`, once ended). What is gone already (a 404) is fine."""

    def results(self, info: BatchInfo) -> AsyncIterator[ResultLine]:
        """The ended batch's result lines, answers and failures alike, each one JSON object in
        OpenAI's batch output shape, streamed (never held whole): its bytes, or the object
        where the API parsed it already (a page of the inline shape's results)."""
