"""`pipeline ray`: one job as N shards on a Ray cluster, one limit for all, merged at the end.

The driver checks the settings as `run` does, connects to the cluster (`--address`, else
RAY_ADDRESS, else a local one it starts), checks that every node can do its part
(`pipeline.cluster.nodes`), then runs each shard as a Ray task (`pipeline.cluster.shard`)
that Ray runs again if its worker or node dies. It shows the shards as one job, stops them
on Ctrl-C or SIGTERM as a first Ctrl-C stops one run (a second cancels what is in flight),
and merges the shards' folders when every shard has ended. Killed, it is run again with the
same command: each shard resumes from its folder.

Nothing the cluster keeps or shows (the job's runtime environment, the tasks' arguments,
logs) holds the API key: the shards read it from their nodes' environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from pipeline.account.cost import money
from pipeline.cluster.board import Board, Coordinator
from pipeline.cluster.nodes import check_nodes
from pipeline.cluster.shard import MARK, run_shard
from pipeline.errors import SettingsError
from pipeline.input.stdin import is_stdin
from pipeline.output.folder import aside, atomic_write, lock_folder, move_aside
from pipeline.output.merge import merge_or_stop
from pipeline.output.shards import shard_folders
from pipeline.pace.actor import NAMESPACE
from pipeline.run.progress import duration
from pipeline.run.summary import EXIT_BUG, EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USAGE
from pipeline.settings import Settings
from pipeline.urls import is_loopback

INSTALL = "pipeline ray needs Ray: pip install 'chat-pipeline[ray]' (make installs it)"
REACH_TIMEOUT = 10.0  # seconds to reach the cluster's address
START_WAIT = 60.0  # seconds before shards that have not started are named


class _Stops:
    """Ctrl-C and SIGTERM, counted: the loop acts on them between two looks at the shards."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.asked += 1


def _reachable(address: str) -> None:
    """A cluster that is not there is said at once: Ray would retry it for ever, silently."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # ray://, auto: Ray's own to resolve
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=REACH_TIMEOUT).close()
    except OSError as e:
        raise SettingsError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}); check "
            "--address or RAY_ADDRESS (the head's IP and GCS port, 6379 by default)"
        ) from None


def connect(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _reachable(address)
    options: dict[str, Any] = {"include_dashboard": False} if address is None else {}
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,  # the shards' lines come through the coordinator, named
            logging_level=logging.ERROR,  # not Ray's notes on starting a local cluster
            **options,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {address}" if address else "started here"
        raise SettingsError(
            f"cannot reach the Ray cluster {where} ({e}); check --address or RAY_ADDRESS"
        ) from None


def _fresh(out: Path) -> None:
    """`--fresh`: the merged files and every shard's folder go aside together, once, here (a
    shard run again by Ray must resume, never start over), each shard's folder under its lock:
    a run still writing there is waited for by no one, and refused."""
    shards = [path for path, _, _ in shard_folders(out)]
    with contextlib.ExitStack() as held:
        for folder in shards:
            held.enter_context(lock_folder(folder))
        target = move_aside(out)
        if shards:
            target = target or aside(out)
            for folder in shards:
                shutil.move(str(folder), str(target / folder.name))


def _other_shards(out: Path, n: int) -> None:
    others = sorted({split for _, _, split in shard_folders(out)} - {n})
    if others:
        raise SettingsError(
            f"{out} holds shards of a run in {', '.join(map(str, others))}: run with --shards {others[0]} to "
            "resume them, or with --fresh to start over (they are moved aside)"
        )


def ray_command(settings: Settings, flags: dict[str, Any], job: Path | None, args: Any) -> int:
    if is_stdin(settings.input):
        raise SettingsError(
            "pipeline ray: every shard reads the input on its own node, and standard input (--input -) "
            "is this process's alone: write the lines to a file on storage every node shares"
        )
    try:
        import ray
    except ImportError:
        print(f"pipeline ray: error: {INSTALL}", file=sys.stderr)
        return EXIT_USAGE
    n: int = args.shards
    out = settings.folder.resolve()  # raises when no output folder is given
    if settings.shard is not None:
        raise SettingsError("pipeline ray runs every shard itself: remove shard from the job file")
    if settings.shared_limit is not None and urlsplit(settings.shared_limit).password is not None:
        raise SettingsError(
            "a password in --shared-limit would reach every node in Ray's task arguments, which the "
            "cluster keeps: use a Redis without one, reachable only inside the cluster, or leave "
            "--shared-limit out (the shards then share the pace through a Ray actor)"
        )
    flags = {
        **flags,
        "input": str(settings.input.resolve()),
        "output": str(out),
        "fresh": None,
        "quiet": True,
        # A budget for the job is a share of it for each shard: together they never pass it.
        "max_cost": settings.max_cost / n if settings.max_cost else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    if not settings.fresh:
        _other_shards(out, n)
    connect(args.address)
    try:
        need_key = not is_loopback(settings.base_url)
        nodes = check_nodes(
            out, settings.input.resolve(), settings.api_key_env, need_key=need_key, cpus=args.cpus_per_shard
        )
        if settings.fresh:
            _fresh(out)
        token = secrets.token_hex(8)
        atomic_write(out / MARK, token.encode())
        return _drive(settings, flags, job, args, out, n, nodes, token)
    finally:
        ray.shutdown()


def _drive(
    settings: Settings,
    flags: dict[str, Any],
    job: Path | None,
    args: Any,
    out: Path,
    n: int,
    nodes: int,
    token: str,
) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: it lives and dies with the driver, not with another node.
    home = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(home, soft=False)
    coordinator: Any = ray.remote(Coordinator).options(num_cpus=0, scheduling_strategy=here).remote()
    task: Any = ray.remote(run_shard)
    job_text = str(job.resolve()) if job is not None else None
    pending = {
        task.options(
            name=f"pipeline shard {k}/{n}",
            num_cpus=args.cpus_per_shard,
            max_retries=args.max_retries,
            retry_exceptions=False,
        ).remote(job_text, flags, k, n, os.getcwd(), coordinator, token, home): k
        for k in range(1, n + 1)
    }
    board = Board(n, quiet=settings.quiet, interval=settings.progress_interval)
    budget = (
        f"; --max-cost {money(settings.max_cost)}: {money(flags['max_cost'])} a shard"
        if settings.max_cost
        else ""
    )
    where = f"on {nodes} node(s)" if nodes else "waiting for a node with CPUs (none has joined yet)"
    board.say(f"pipeline ray: {n} shards of {settings.input} {where}, into {out}/{budget}")
    stops = _Stops()
    before = {s: signal.signal(s, stops) for s in (signal.SIGINT, signal.SIGTERM)}
    results: dict[int, dict[str, Any]] = {}
    level, waiting_said = 0, False
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.25)
            for ref in ready:
                results[pending.pop(ref)] = _result(ref)
            with contextlib.suppress(ray.exceptions.RayError):  # shown at the next look
                board.show(*ray.get(coordinator.take.remote(), timeout=5))
            unstarted = {ref: k for ref, k in pending.items() if k not in board.figures}
            if unstarted and not waiting_said and board.elapsed() > START_WAIT:
                waiting_said = True
                board.say(
                    f"pipeline ray: shard(s) {', '.join(f'{k}/{n}' for k in sorted(unstarted.values()))} not "
                    f"started after {START_WAIT:g}s: the cluster has no {args.cpus_per_shard:g} CPU free for "
                    "them yet (`ray status` shows what waits)"
                )
            if stops.asked > level:
                level = stops.asked
                _stop(level, coordinator, pending, unstarted, board)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        board.close()
    return _end(
        results, out, n, interrupted=level > 0, elapsed=board.elapsed(), pending=board.pending(results)
    )


def _result(ref: Any) -> dict[str, Any]:
    import ray

    try:
        result: dict[str, Any] = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return {"exit": EXIT_INTERRUPTED, "message": "cancelled"}
    except ray.exceptions.RayError as e:
        return {"exit": EXIT_STOPPED, "message": f"lost ({type(e).__name__}) after every retry"}
    return result


def _stop(
    level: int, coordinator: Any, pending: dict[Any, int], unstarted: dict[Any, int], board: Board
) -> None:
    """The first Ctrl-C: every shard stops as a first Ctrl-C stops one run, and those not
    started yet never start; the second: what is in flight is cancelled; the third: the
    shards end at once (what they wrote is safe: a run killed at any moment resumes)."""
    import ray

    if level <= 2:
        coordinator.stop.remote(level)
        for ref in unstarted:
            ray.cancel(ref)
        board.say(
            "pipeline ray: stopping every shard: nothing new is sent, what is in flight may finish; "
            "Ctrl-C again cancels it"
            if level == 1
            else "pipeline ray: cancelling what is in flight; Ctrl-C again ends the shards at once"
        )
    else:
        for ref in pending:
            ray.cancel(ref, force=True)


def _end(
    results: dict[int, dict[str, Any]],
    out: Path,
    n: int,
    *,
    interrupted: bool,
    elapsed: float,
    pending: int | None,
) -> int:
    def total(key: str) -> int:
        return sum(r.get(key) or 0 for r in results.values())

    print(
        f"\nThis run: {total('succeeded'):,} succeeded, {total('failed'):,} failed, "
        f"{total('invalid_input'):,} invalid input lines, {total('skipped'):,} already done, "
        f"{'an unknown number of' if pending is None else f'{pending:,}'} pending, in {duration(elapsed)}, over {n} shards."
    )
    codes: dict[int, int] = {k: int(r["exit"]) for k, r in results.items()}
    for k, r in sorted(results.items()):
        if r["exit"] not in (0, 1, EXIT_INTERRUPTED):
            print(f"pipeline ray: shard {k}/{n}: {r['message']}", file=sys.stderr)
    if interrupted or any(c not in (0, 1) for c in codes.values()):
        print(
            f"pipeline ray: not merged: not every shard ended; run the same command again to resume "
            f"(or `pipeline merge --partial {out}` for what there is)",
            file=sys.stderr,
        )
        if interrupted:
            return EXIT_INTERRUPTED
        for code in (EXIT_USAGE, EXIT_BUG, EXIT_STOPPED):
            if code in codes.values():
                return code
        return EXIT_STOPPED
    print(merge_or_stop(out, partial=False))  # a folder that cannot be written: exit 3
    return max(codes.values())
