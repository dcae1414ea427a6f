"""Deleting what a batch taken in left at the provider: its prompts and answers are the
user's data (a nightly job would leave them there for ever, and fill the organisation's file
storage), and nothing of the run needs them once the batch is taken in.

    files shape    its input, output and error files (`DELETE {base}/files/{id}`)
    inline shape   the batch, its requests and results with it (OpenRouter's
                   `DELETE {base}/batches/{id}`)

Only once the batch is committed `taken`: a run killed before that takes it in again, from
its output file. A run killed between that commit and the deletes leaves the batch taken and
not cleared (its info does not say CLEARED): the next run into the folder, or `pipeline
cancel OUT`, clears it. A delete that fails (a 5xx past the retry policy, a 403) never fails
the run: it is said once, no more is deleted in this run (a provider failing its deletes
would hold the run's end a retry policy's minutes for every file), and the next run tries
again. `batch_keep_files = true` keeps everything, for those who audit at the provider. A
batch that answered ids it was not given is never deleted: it may be another's (`STRANGERS`).

The deletes go on beside the following (`Clearer.run`, fed as batches are taken in): a slow
or failing delete holds up no look at a running batch.
"""

from __future__ import annotations

from collections.abc import Callable

from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.batch.book import TAKEN, Batch, Book
from pipeline.errors import RequestError
from pipeline.send.batchapi import BatchApi

CLEARED = "cleared"  # (an info key of ours: what the taken batch left at the provider is deleted)
FILES = ("input_file", "output_file", "error_file")  # the info keys that name its files
# An info key of the intake's: result lines for ids the batch was not given. Such a batch may
# be another's (a shard's, another job's), found by its model and size after a run was killed
# making ours, where the provider keeps no tag (`batchfind.pick`): it is left at the provider,
# where its owner still needs it.
STRANGERS = "strangers"


def uncleared(book: Book) -> list[Batch]:
    """The folder's batches taken in whose leavings at the provider are not deleted yet."""
    return [b for b in book.batches(TAKEN) if b.batch_id and not _kept(b.info or {})]


def _kept(info: dict[str, object]) -> bool:
    return bool(info.get(CLEARED) or info.get(STRANGERS))


async def clear(api: BatchApi, book: Book, n: int) -> RequestError | None:
    """Delete what batch n left at the provider, and note it (committed by the caller); the
    error where a delete failed (nothing is noted: the next run tries again)."""
    batch = book.batch(n)
    info = batch.info or {}
    if batch.batch_id is None or _kept(info):
        return None
    files = [file_id for key in FILES if isinstance(file_id := info.get(key), str) and file_id]
    try:
        await api.clear(batch.batch_id, files)
    except RequestError as e:
        return e
    book.looked(n, {**info, CLEARED: True})
    return None


def not_cleared(n: int, error: RequestError) -> str:
    """The one line said of a run's deletes that failed."""
    return (
        f"pipeline: what batch {n} left at the provider (its requests and answers) could not be "
        f"deleted ({error.message}); no more is deleted now, and the next run into the folder tries "
        "again (batch_keep_files = true keeps it all there on purpose)"
    )


class Clearer:
    """The run's deletes, one batch after another, as batches are taken in, while the run goes
    on: stopped (Ctrl-C, a refused key, the budget), it deletes no more, and the next run does
    the rest (a folder from before deletes has every batch it took in to clear)."""

    def __init__(
        self,
        api: BatchApi,
        book: Book,
        *,
        commit: Callable[[], bool],
        say: Callable[[str], None],
        going: Callable[[], bool] = lambda: True,
    ) -> None:
        self.api, self.book, self.commit, self.say, self.going = api, book, commit, say, going
        # A delete failed, or the folder took no more: the rest is the next run's to clear.
        self.stopped = False

    async def run(self, taken: MemoryObjectReceiveStream[int]) -> None:
        async with taken:
            async for n in taken:  # (read to the end: the stream's senders never wait)
                if self.stopped or not self.going():
                    continue
                error = await clear(self.api, self.book, n)
                if error is not None:
                    self.say(not_cleared(n, error))
                self.stopped = error is not None or not self.commit()
