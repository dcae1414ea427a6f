"""A real local Ray cluster of several nodes (`ray.cluster_utils.Cluster`, every node on this
machine) for the tests of `pipeline ray`, and the driver run against it as a user runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import FAKE_KEY, read_jsonl

KEY_ENV = "LUMENFALL_API_KEY"
RATE = 60.0  # requests a second the mock allows


class RayCluster:
    def __init__(self) -> None:
        try:
            from ray.cluster_utils import Cluster
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip("Ray is not installed: pip install 'chat-pipeline[ray]' (make installs it)")
        # Short: Ray's sockets live under it, and a socket's path is 107 bytes at most.
        self.tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self._env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", KEY_ENV)}
        os.environ["RAY_TMPDIR"] = str(self.tmp)
        os.environ[KEY_ENV] = FAKE_KEY  # the nodes' environment: where shards read the key
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False},
        )
        self.nodes: list[Any] = []
        for _ in range(2):
            self.add_node()
        self.address: str = self.cluster.address

    def add_node(self, **args: Any) -> Any:
        node = self.cluster.add_node(num_cpus=1, **args)
        self.cluster.wait_for_nodes()
        self.nodes.append(node)
        return node

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def node_running_a_shard(self) -> Any:
        """A worker node with a shard's task on it (Ray titles its process after the task)."""
        for node in self.nodes:
            raylet = node.all_processes["raylet"][0].process.pid
            if any(b"ray::pipeline shard" in _cmdline(pid) for pid in _descendants(raylet)):
                return node
        return None

    def shutdown(self) -> None:
        self.cluster.shutdown()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.tmp, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def running_cluster() -> Iterator[RayCluster]:
    """A module's cluster (its fixture yields from this): a head and two nodes of one CPU."""
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


async def ray_run(
    url: str, src: Path, out: Path, address: str, *extra: str, key: bool = False
) -> asyncio.subprocess.Process:
    """`pipeline ray` with 4 shards, as a driver of its own; without the key in its
    environment unless `key`: the shards can only have it from their nodes'."""
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if key:
        env[KEY_ENV] = FAKE_KEY
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        "ray",
        "--input",
        str(src),
        "--output",
        str(out),
        "--base-url",
        url,
        "--quiet",
        "--shards",
        "4",
        "--address",
        address,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


def ids(path: Path) -> list[str]:
    return sorted(row["custom_id"] for row in read_jsonl(path))


def exactly_once(out: Path, n: int) -> None:
    """Every line once in the merge, and in no two shards' folders."""
    each = [i for k in range(1, 5) for i in ids(out / f"shard-{k}-of-4/results.jsonl")]
    assert len(each) == len(set(each)) == n
    assert ids(out / "results.jsonl") == sorted(each)


def pipeline_usage(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((folder / "usage.json").read_bytes())
    return doc
