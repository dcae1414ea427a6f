"""One shard of `pipeline ray`, as a Ray task: our runner inside it, into OUT/shard-K-of-N/.

The task builds its settings on its node from the job file and the driver's flags (no key
among them: the node's environment holds it), and runs `pipeline.run.runner.run` with a
`ShardHost`: the account's pace in a Ray actor (`pipeline.pace.actor`) unless the job
shares it through Redis, and the driver, not a signal, to stop it. Twice a second it tells
the driver where it stands and what it said, and hears whether to stop.

Ray runs the task again when its worker or node dies (`max_retries`): the run resumes from
its folder, as `pipeline run` does, so nothing is lost or doubled. The attempt Ray gave up
on may still hold the folder's lock for a moment; the new one waits for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.errors import FolderBusy, RunStopped, SettingsError
from pipeline.pace.pacer import Pacer
from pipeline.run.host import Host, scope_key
from pipeline.run.summary import EXIT_BUG, EXIT_STOPPED, EXIT_USAGE
from pipeline.settings import build

if TYPE_CHECKING:
    from pipeline.run.control import Control
    from pipeline.run.progress import Progress
    from pipeline.settings import Settings

REPORT_EVERY = 0.5  # seconds between reports to the driver
DRIVER_GONE = 10.0  # seconds without an answer from the driver before the shard stops itself
BUSY_WAIT = 120.0  # seconds a shard run again waits for the attempt before it to let go of the folder
MARK = ".pipeline-ray"  # in OUT: the driver's token, which a shard must see there before it starts


class ShardHost(Host):
    """A run that is shard `k` of a `pipeline ray` job."""

    def __init__(self, coordinator: Any, k: int, home: str | None = None) -> None:
        self.coordinator = coordinator
        self.k = k
        self.home = home  # the driver's node: where the pace actor is made
        self._said: list[str] = []

    def pacer(
        self,
        settings: Settings,
        api_key: str | None,
        request_rate: float | None,
        token_rate: float | None,
        say: Callable[[str], None],
        model: str | None = None,
    ) -> Pacer:
        if settings.shared_limit is not None:
            return super().pacer(settings, api_key, request_rate, token_rate, say, model)
        from pipeline.pace.actor import ActorStore
        from pipeline.pace.leased import shared_pacer
        from pipeline.pace.store import account_key

        account = scope_key(account_key(settings.base_url, api_key), model)
        return shared_pacer(
            partial(ActorStore, account, self.home),
            f"(the Ray actor {account})",
            request_rate=request_rate,
            token_rate=token_rate,
            processes=settings.shard.n if settings.shard else 1,
            say=say,
        )

    async def watch(self, control: Control, progress: Progress) -> None:
        """Report to the driver; stop as it says (1: as a first Ctrl-C, 2: as a second), or
        when it has been gone for DRIVER_GONE seconds (killed: no one would merge this)."""
        import ray.exceptions

        progress.heard.append(self._said.append)
        level, heard_at = 0, time.monotonic()
        while True:
            said = self._said.copy()
            self._said.clear()
            try:
                with anyio.fail_after(DRIVER_GONE / 2):
                    wanted = await self.coordinator.report.remote(self.k, progress.figures(), said)
                heard_at = time.monotonic()
            except (TimeoutError, ray.exceptions.RayError):
                self._said[:0] = said  # told at the next report
                wanted = 1 if time.monotonic() - heard_at > DRIVER_GONE else level
            if wanted > level:
                level = wanted
                if control.dispatching:
                    progress.say(control.interrupt())
                if level > 1:
                    progress.say(control.cancel())
            await anyio.sleep(REPORT_EVERY)


def run_shard(
    job: str | None,
    flags: dict[str, Any],
    k: int,
    n: int,
    cwd: str,
    coordinator: Any,
    token: str,
    home: str | None = None,
) -> dict[str, Any]:
    """The task: shard k of n, to its end. Returns its exit status, what it says, and its counts."""
    from pipeline.run.runner import loop_options, run

    node = socket.gethostname()
    try:
        seen = (Path(flags["output"]) / MARK).read_text() == token
    except OSError:
        seen = False
    if not seen:  # a node that joined after the check, without the shared storage
        return {
            "exit": EXIT_USAGE,
            "message": f"on {node}: {flags['output']} is not the folder the driver wrote to: this "
            "node does not share its storage; mount it on every node, then run the same command again",
        }
    with contextlib.suppress(OSError):
        os.chdir(cwd)  # relative paths in the job file mean what they meant at the driver
    try:
        settings = build(Path(job) if job else None, **{**flags, "shard": f"{k}/{n}"})
        if settings.metrics_port is not None:  # (shards may share a node: a port each)
            settings = replace(settings, metrics_port=settings.metrics_port + k - 1)
        host = ShardHost(coordinator, k, home)
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                summary = anyio.run(run, settings, host, backend="asyncio", backend_options=loop_options())
                break
            except FolderBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except SettingsError as e:
        return {"exit": EXIT_USAGE, "message": f"on {node}: {e}"}
    except RunStopped as e:
        return {"exit": EXIT_STOPPED, "message": f"stopped on {node}: {e}"}
    except Exception:
        return {"exit": EXIT_BUG, "message": f"internal error on {node}:\n{traceback.format_exc()}"}
    return {
        "exit": summary.exit_code,
        "message": summary.message,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "invalid_input": summary.invalid_input,
        "skipped": summary.skipped,
        "pending": summary.pending,
        "node": node,
    }
