"""`pipeline cancel OUT`: cancel the folder's batches at the provider, and keep what they did.

Every batch the book has running is cancelled, and so is one it has creating (a run killed
while making it) once found by its tag. The provider keeps what a cancelled batch finished:
the next run into the folder (the same command) takes it in, as it takes in any batch that
ended while no run followed it, and sends what was not run again. Batches staged and never
submitted cost nothing and stay staged. The book is not changed but for a batch found, and
batches taken in whose leavings at the provider a killed run did not delete are cleared
(`pipeline.batch.clear`, unless the run kept them: `batch_keep_files`), once the running
ones are cancelled. A batch deleted at the provider while this waits (a run took it in, at
the inline shape) has ended.

The book is written under the folder's lock, as a run writes it. While a run holds the
folder (the nightly run still going), cancel writes nothing: it reads the book as it stands
and cancels its running batches at the provider, which is what a person running it then
wants; the run sees them cancelled at its next look, takes in what they did, and stops
(`follow`: cancelled while followed). A batch the run is making at that moment is cancelled
if the provider has it already, else said to run cancel again.

Exit status: 0 every batch ended (cancelled, or done before the cancel reached it); 3 some
were still cancelling when this stopped waiting, or could not be cancelled (they are said).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson

from pipeline.batch.book import CREATING, ENDPOINT, RUNNING, Batch, Book
from pipeline.batch.clear import clear, not_cleared, uncleared
from pipeline.batch.clock import Clock
from pipeline.batch.submit import SKEW, info_state
from pipeline.errors import FolderBusy, HTTPStatusError, RequestError, RunStopped, SettingsError
from pipeline.output.folder import LEDGER, lock_folder
from pipeline.output.ledger import Ledger
from pipeline.output.shards import shard_folders
from pipeline.run.summary import EXIT_OK, EXIT_STOPPED
from pipeline.send.batchapi import BatchApi, BatchInfo, NoBatchApi
from pipeline.settings import DEFAULT_KEY_ENV
from pipeline.urls import DEFAULT_BASE_URL, is_loopback, redacted

PATIENCE = 600.0  # seconds to wait for the batches to end once cancelled
LOOK_EVERY = 5.0


def cancel_folder(folder: Path, base_url: str | None = None, api_key_env: str | None = None) -> int:
    """The command's work; its exit status. The endpoint and the key's variable not given are
    the ones the folder's batch run used (its book keeps them), else the defaults. A folder of
    shards (OUT/shard-K-of-N/, each run with --shard and its own book) has each shard's
    batches cancelled; the status is the worst of theirs."""
    if not (folder / LEDGER).exists():
        shards = [path for path, _, _ in shard_folders(folder)] if folder.is_dir() else []
        shards = [path for path in shards if (path / LEDGER).exists()]
        if shards:
            # (each says what it cancelled, under its own name)
            return max(cancel_folder(path, base_url, api_key_env) for path in shards)
        raise SettingsError(f"{folder} holds no run (no {LEDGER}): nothing to cancel")
    used = _endpoint_used(folder)
    if base_url is None and used and "base_url" not in used:
        # The run's URL carried a secret and was not kept: the default endpoint is not where
        # the batches went, and the key the run used is not to be sent there.
        raise SettingsError(
            f"{folder}'s batches went to a base URL with credentials in it, which the folder does not "
            "keep: pass it again with --base-url"
        )
    base_url = base_url or used.get("base_url") or DEFAULT_BASE_URL
    key_env = api_key_env or used.get("api_key_env") or DEFAULT_KEY_ENV
    shape = used.get("batch_api")
    api_key = os.environ.get(key_env) or None
    if api_key is None and not is_loopback(base_url):
        raise SettingsError(
            f"no API key: set the environment variable {key_env} to the key for {redacted(base_url)}"
        )

    async def main() -> int:
        from pipeline.send.batchclient import open_batch_api

        try:
            async with open_batch_api(base_url, api_key, shape if isinstance(shape, str) else None) as api:
                return await cancel_batches(folder, api)
        except NoBatchApi:
            raise SettingsError(f"{redacted(base_url)} has no batch API: nothing to cancel there") from None

    return anyio.run(main)


def _endpoint_used(folder: Path) -> dict[str, Any]:
    with _reading(folder) as db:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (ENDPOINT,)).fetchone()
        except sqlite3.Error as e:
            _unreadable(folder, e)
            return {}
    used = orjson.loads(row[0]) if row is not None else None
    if not isinstance(used, dict):
        return {}
    return {key: value for key, value in used.items() if isinstance(value, str)}


@contextlib.contextmanager
def _reading(folder: Path) -> Iterator[sqlite3.Connection]:
    """The folder's ledger, read only: a run may be writing it (nothing here takes its lock)."""
    db = sqlite3.connect(f"{(folder / LEDGER).resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def _unreadable(folder: Path, error: sqlite3.Error) -> None:
    """An error reading the ledger a run holds, unless it is only a table the folder's runs
    never made: a stop, never "nothing to cancel" (exit 0 with the batches still running)."""
    if isinstance(error, sqlite3.OperationalError) and str(error).startswith("no such table"):
        return
    raise RunStopped(
        f"cannot read {folder / LEDGER} ({error}) while a run holds the folder; nothing was cancelled: "
        "run the same command again",
        code="ledger_unreadable",
    )


def _book_as_is(folder: Path) -> list[Batch]:
    """The folder's batches as its book says now, read while a run holds the folder."""
    with _reading(folder) as db:
        try:
            rows = db.execute(
                "SELECT n, tag, model, state, batch_id, lines, bytes, reserved, at, NULL FROM batches ORDER BY n"
            ).fetchall()
        except sqlite3.Error as e:
            _unreadable(folder, e)
            return []  # (no batches table: a folder of synchronous runs only)
    return [Batch(*row) for row in rows]


async def cancel_batches(
    folder: Path,
    api: BatchApi,
    *,
    clock: Clock | None = None,
    patience: float = PATIENCE,
    say: Callable[[str], None] | None = None,
) -> int:
    clock = clock or Clock()
    tell = say or (lambda text: print(text, file=sys.stderr, flush=True))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lock_folder(folder))
        except FolderBusy:
            holder = _holder(folder)
            tell(
                f"pipeline cancel: a run is using {folder} now ({holder}): its running batches are "
                "cancelled at the provider, and that run takes in what they did, then stops"
            )
            ids, _ = await _found(api, _book_as_is(folder))
            held_here = False
        else:
            ids = await _noted(folder, api)
            held_here = True
        left: dict[int, BatchInfo | None] = {}
        failed = 0
        for n, batch_id in sorted(ids.items()):
            try:
                left[n] = await api.cancel(batch_id)
            except RequestError as e:
                failed += 1
                tell(f"pipeline cancel: batch {n} ({batch_id}) could not be cancelled: {e.message}")
        if held_here:
            # After the cancels: a provider failing its deletes holds one for the retry
            # policy's minutes, while the batches running would go on being paid for.
            await _clear_taken(folder, api, tell)
    # (the folder let go of: a run may begin while the batches end)
    if not ids:
        tell(f"pipeline cancel: no batch of {folder} is running: nothing to cancel")
        return EXIT_OK

    started = clock.now()
    wake = anyio.Event()  # (never set: the waits are the clock's)
    gone: set[int] = set()  # taken in by a run meanwhile, and deleted (the inline shape's)
    while (
        any(n not in gone and (info is None or not info.ended) for n, info in left.items())
        and clock.now() - started < patience
    ):
        await clock.wait(LOOK_EVERY, wake)
        for n, info in left.items():
            if n not in gone and (info is None or not info.ended):
                try:
                    left[n] = await api.get(ids[n])
                except HTTPStatusError as e:
                    left[n] = None
                    if e.status == 404:  # (a batch running is never deleted: it ended)
                        gone.add(n)
                except RequestError:
                    left[n] = None
    ended = [info for info in left.values() if info is not None and info.ended]
    done = sum(info.counts.completed for info in ended)
    tell(
        f"pipeline cancel: {len(ended) + len(gone):,} of {len(ids):,} batch(es) ended ({done:,} lines "
        "answered before the cancel, kept at the provider); the same run command takes them in, and sends "
        "what they did not run"
        + (f" ({len(gone):,} taken in already by a run, and deleted at the provider)" if gone else "")
    )
    still = len(left) - len(ended) - len(gone)
    if still or failed:
        tell(
            f"pipeline cancel: {still + failed:,} batch(es) not ended yet: run pipeline cancel {folder} again later"
        )
        return EXIT_STOPPED
    return EXIT_OK


async def _found(api: BatchApi, batches: list[Batch]) -> tuple[dict[int, str], dict[int, BatchInfo]]:
    """The running batches' ids, with those of the creating ones the provider has (found by
    their tags), and those found, as described."""
    ids: dict[int, str] = {}
    made: dict[int, BatchInfo] = {}
    for batch in batches:
        if batch.state == CREATING and batch.at is not None:
            others = [b.batch_id for b in batches if b.batch_id and b.n != batch.n]
            found = await api.find(
                batch.tag, since=batch.at - SKEW, model=batch.model, lines=batch.lines, taken=others
            )
            if found is not None:
                ids[batch.n], made[batch.n] = found.id, found
        elif batch.state == RUNNING and batch.batch_id:
            ids[batch.n] = batch.batch_id
    return ids, made


async def _noted(folder: Path, api: BatchApi) -> dict[int, str]:
    """`_found`, under the folder's lock: a creating batch found is noted running."""
    ledger = Ledger(folder / LEDGER)
    try:
        book = Book(ledger, folder)
        ids, made = await _found(api, book.batches(CREATING, RUNNING))
        for n, found in made.items():  # made by a run killed before it noted the id: noted now
            book.running(n, found.id, info_state(found))
            ledger.commit()
    finally:
        ledger.close()
    return ids


async def _clear_taken(folder: Path, api: BatchApi, tell: Callable[[str], None]) -> None:
    """Under the folder's lock: what batches taken in left at the provider is deleted, where a
    killed run did not (and the run did not keep it: `batch_keep_files`)."""
    ledger = Ledger(folder / LEDGER)
    try:
        book = Book(ledger, folder)
        used = ledger.get(ENDPOINT)
        if isinstance(used, dict) and used.get("keep_files") is True:
            return
        cleared = 0
        for batch in uncleared(book):
            error = await clear(api, book, batch.n)
            if error is not None:
                tell(not_cleared(batch.n, error).replace("pipeline:", "pipeline cancel:", 1))
                break
            ledger.commit()
            cleared += 1
        if cleared:
            tell(f"pipeline cancel: deleted what {cleared:,} batch(es) taken in left at the provider")
    finally:
        ledger.close()


def _holder(folder: Path) -> str:
    try:
        return (folder / ".lock").read_text().strip() or "another process"
    except OSError:
        return "another process"
