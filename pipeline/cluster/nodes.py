"""Before anything is sent: can every node that may run a shard do its part?

One small task pinned to each live node that has CPUs (where shards may be placed) reads a
file the driver just wrote into the output folder, writes one back that the driver must see,
reads the input, and says whether the key's variable is set in its environment (whether,
never what). A node that fails any of these is named with what to do, and nothing is sent.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.errors import SettingsError

PROBE_TIMEOUT = 120.0  # seconds for every node's probe to come back (a busy cluster queues them)
PROBE = ".pipeline-probe-"


def sweep_probes(out: Path, *, now: float | None = None) -> int:
    """Remove the probes a killed driver left in OUT (a check's own are gone within
    PROBE_TIMEOUT, so an older one is nobody's); returns how many."""
    now = time.time() if now is None else now
    swept = 0
    for leftover in out.glob(f"{PROBE}*"):
        try:
            if now - leftover.stat().st_mtime > 2 * PROBE_TIMEOUT:
                leftover.unlink()
                swept += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove: litter, not harm
    return swept


def _probe(out: str, token: str, input_path: str, key_env: str) -> dict[str, Any]:
    """On the node: what it sees of the folder, the input and the key's variable."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    folder = Path(out)
    seen: bool
    try:
        seen = (folder / f"{PROBE}{token}").read_text() == token
    except OSError:
        seen = False
    wrote = None
    try:
        (folder / f"{PROBE}{token}-{node}").write_text(token)
    except OSError as e:
        wrote = e.strerror or type(e).__name__
    return {
        "node": node,
        "host": socket.gethostname(),
        "seen": seen,
        "wrote": wrote,
        "input": os.access(input_path, os.R_OK),
        "key": bool(os.environ.get(key_env)),
    }


def check_nodes(out: Path, input_path: Path, key_env: str, *, need_key: bool, cpus: float) -> int:
    """Raise `SettingsError` naming each node that cannot run a shard; return how many can.
    `need_key`: the endpoint needs the key (it is not on this machine); if any node has it,
    every node must. `cpus`: what a shard asks for, which some node must have."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    every: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    nodes = [n for n in every if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise SettingsError(
            "the Ray cluster has no live node with CPUs to run shards on; `ray status` shows it"
        )
    sweep_probes(out)
    token = secrets.token_hex(8)
    mine = out / f"{PROBE}{token}"
    mine.write_text(token)
    probe: Any = ray.remote(_probe)
    refs = [
        probe.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(out), token, str(input_path), key_env)
        for n in nodes
    ]
    deadline = time.monotonic() + PROBE_TIMEOUT
    answers: list[dict[str, Any]] = []
    try:
        for asked, ref in zip(nodes, refs, strict=True):
            try:
                answers.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.1)))
            except ray.exceptions.GetTimeoutError:
                raise SettingsError(
                    f"node {asked['NodeManagerAddress']} ({asked['NodeID'][:8]}) did not answer within "
                    f"{PROBE_TIMEOUT:g}s; `ray status` shows the cluster's nodes"
                ) from None
            except ray.exceptions.RayError:
                continue  # the node went away meanwhile: no shard will run there
    finally:
        mine.unlink(missing_ok=True)
    if not answers:
        raise SettingsError(
            "every node of the Ray cluster went away during the check; `ray status` shows them"
        )
    # A local server may take no key; but some nodes with it and others without is a mistake.
    need_key = need_key or any(a["key"] for a in answers)
    problems = []
    for a in answers:
        node = f"node {a['host']} ({a['node'][:8]})"
        theirs = out / f"{PROBE}{token}-{a['node']}"
        back = theirs.exists()
        theirs.unlink(missing_ok=True)
        if a["wrote"] is not None:
            problems.append(f"{node} cannot write to {out} ({a['wrote']})")
        elif not a["seen"] or not back:
            problems.append(
                f"{node} does not see the output folder {out} the driver sees: --output must be "
                "on storage every node shares (NFS, a mounted bucket, a shared volume)"
            )
        if not a["input"]:
            problems.append(f"{node} cannot read the input {input_path}: put it on storage every node shares")
        if need_key and not a["key"]:
            problems.append(
                f"{node} has no {key_env} in its environment: set it on every node (a Kubernetes "
                "secret, as the README shows); it never goes through Ray"
            )
    if problems:
        raise SettingsError("; ".join(problems) + "; nothing was sent")
    return len(answers)
