"""`pipeline ray` on a real local Ray cluster (tests/raycluster.py) stopped, killed or refused,
and what it refuses before any cluster: every line once, nothing sent where a node cannot
take part, the key and a store's password nowhere. No limit is measured here (tests/test_ray.py
measures them, alone), so these run beside the other tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from tests.conftest import FAKE_KEY, bodies, write_jsonl
from tests.raycluster import KEY_ENV, RATE, RayCluster, exactly_once, ray_run, running_cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    yield from running_cluster()


def test_without_ray_it_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    src = write_jsonl(tmp_path / "in.jsonl", bodies(2))
    code = main(["ray", "--input", str(src), "--output", str(tmp_path / "out"), "--shards", "2"])
    assert code == 2
    assert "pip install 'chat-pipeline[ray]'" in capsys.readouterr().err


async def _accepted(server: Any, n: int) -> None:
    for _ in range(300):
        if sum(server.state.accepted_per_second.values()) >= n:
            return
        await asyncio.sleep(0.1)


async def _quiet(server: Any, *, within: float) -> float | None:
    """Seconds until the server has had no request for a whole second, if within `within`."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen, since = -1, began
    while loop.time() - began < within + 1:
        count = sum(server.state.statuses.values())
        if count != seen:
            seen, since = count, loop.time()
        elif loop.time() - since >= 1.0:
            return since - began
        await asyncio.sleep(0.05)
    return None


async def test_ctrl_c_then_kill_9_of_the_driver_the_same_command_resumes_exactly_once(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(480))
    out = tmp_path / "out"
    rpm = ("--rpm", str(RATE * 60))
    async with mock(rpm=RATE * 60, latency=0.05, api_key=FAKE_KEY) as (url, server):
        proc = await ray_run(url, src, out, ray_cluster.address, *rpm)
        await _accepted(server, 120)
        assert proc.returncode is None, (await proc.communicate())[1].decode()[-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out1, err = await proc.communicate()
        stopped_at = sum(server.state.statuses.values())
        await asyncio.sleep(1.0)
        assert sum(server.state.statuses.values()) == stopped_at  # every shard stopped sending
        assert not (out / "results.jsonl").exists()  # not merged: not every shard ended

        proc = await ray_run(url, src, out, ray_cluster.address, *rpm)
        await _accepted(server, stopped_at + 120)
        assert proc.returncode is None, (await proc.communicate())[1].decode()[-3000:]
        proc.send_signal(signal.SIGKILL)  # the driver killed: its shards stop with it
        await proc.wait()
        # At once: Ray ends the tasks of a driver that died (DRIVER_GONE is for one that hangs).
        quiet_within = await _quiet(server, within=5.0)
        assert quiet_within is not None, "the shards went on sending after their driver was killed"

        again = await ray_run(url, src, out, ray_cluster.address, *rpm)
        out3, err3 = await again.communicate()
    assert b"stopping every shard" in err
    assert b"run the same command again to resume" in err
    # Each shard ended as a first Ctrl-C ends a run: what it did is counted, none was lost.
    done = re.search(rb"This run: ([\d,]+) succeeded", out1)
    assert done is not None, out1
    assert int(done.group(1).replace(b",", b"")) >= 120
    assert b"lost (" not in err
    assert again.returncode == 0, err3.decode()[-2000:]
    assert b" 0 already done" not in out3
    exactly_once(out, 480)


# The pace actor's store, told to make it on a node that is gone.
HOME_GONE = """
import sys, anyio, ray
from pipeline.pace.actor import ActorStore
ray.init(address=sys.argv[1], logging_level="ERROR")
store = ActorStore("pipeline:pace:home-gone", home=sys.argv[2])
anyio.run(store.check)
print(ray._private.state.actors(store._actor._actor_id.hex())["Address"]["NodeID"])
"""


async def test_a_pace_actor_whose_node_is_gone_is_made_on_another(ray_cluster: RayCluster) -> None:
    gone = "ab" * 28  # a node id the cluster does not have (any more)
    ask = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOME_GONE, ray_cluster.address, gone, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(ask.communicate(), 90)
    assert ask.returncode == 0
    assert out.decode().split()[-1] in {
        n.node_id for n in [ray_cluster.cluster.head_node, *ray_cluster.nodes]
    }


# The test that takes a node away comes last: a node removed is found dead only some 15 s
# later, and until then the next driver's check of every node waits for it.


async def test_a_node_without_the_key_is_named_and_nothing_is_sent(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    keyless = ray_cluster.add_node(env_vars={KEY_ENV: ""})
    try:
        src = write_jsonl(tmp_path / "in.jsonl", bodies(20))
        async with mock(api_key=FAKE_KEY) as (url, server):
            proc = await ray_run(url, src, tmp_path / "out", ray_cluster.address)
            _, err = await proc.communicate()
            sent = sum(server.state.statuses.values())
    finally:
        ray_cluster.remove_node(keyless)
    assert proc.returncode == 2, err.decode()[-2000:]
    assert f"has no {KEY_ENV} in its environment".encode() in err
    assert err.count(b"has no") == 1  # that node only
    assert sent == 0


def ray_main(tmp_path: Path, *extra: str) -> int:
    """`pipeline ray` on two lines, in this process: for what it refuses before any cluster."""
    if not os.environ.get("CI"):
        pytest.importorskip("ray")
    src = write_jsonl(tmp_path / "in.jsonl", bodies(2))
    return main(["ray", "--input", str(src), "--output", str(tmp_path / "out"), "--shards", "2", *extra])


def test_a_password_in_the_store_url_never_goes_through_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ray_main(tmp_path, "--shared-limit", "redis://:s3cret-store-pw@127.0.0.1:1/0")
    err = capsys.readouterr().err
    assert code == 2
    assert "would reach every node in Ray's task arguments" in err
    assert "s3cret-store-pw" not in err


def test_fresh_moves_every_shard_aside_under_its_lock(tmp_path: Path) -> None:
    from pipeline.cluster.driver import _fresh
    from pipeline.errors import FolderBusy
    from pipeline.output.folder import lock_folder

    out = tmp_path / "out"
    for k in (1, 2):
        (out / f"shard-{k}-of-2").mkdir(parents=True)
        write_jsonl(out / f"shard-{k}-of-2" / "results.jsonl", [{"custom_id": f"a{k}"}])
    write_jsonl(out / "results.jsonl", [{"custom_id": "a1"}, {"custom_id": "a2"}])
    with lock_folder(out / "shard-2-of-2"), pytest.raises(FolderBusy):
        _fresh(out)  # a shard still writing: nothing is moved
    assert (out / "shard-1-of-2/results.jsonl").exists()
    _fresh(out)
    (first,) = out.glob("previous-*")
    assert sorted(p.name for p in first.iterdir()) == ["results.jsonl", "shard-1-of-2", "shard-2-of-2"]
    for k in (1, 2):  # shards only, the second time: moved aside again, not in each other's way
        (out / f"shard-{k}-of-2").mkdir()
        write_jsonl(out / f"shard-{k}-of-2" / "results.jsonl", [{"custom_id": f"b{k}"}])
    _fresh(out)
    assert len(list(out.glob("previous-*"))) == 2
    assert not list(out.glob("shard-*"))


def test_a_shard_on_a_node_without_the_shared_folder_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that joined after the check, with the path but not the storage: the shard sees
    no token of the driver's there, and says so instead of writing where no merge looks."""
    from pipeline.cluster.shard import MARK, run_shard

    src = write_jsonl(tmp_path / "in.jsonl", bodies(2))
    out = tmp_path / "out"
    out.mkdir()
    (out / MARK).write_text("the driver's token")
    flags = {"input": str(src), "output": str(out), "quiet": True}
    monkeypatch.chdir(tmp_path)  # a shard that starts moves to the driver's folder
    result = run_shard(None, flags, 1, 2, str(tmp_path), None, "another token")
    assert result["exit"] == 2
    assert "does not share its storage" in result["message"]
    assert not (out / "shard-1-of-2").exists()


def test_a_cluster_that_is_not_there_is_said_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray itself retries an address that answers nothing for ever; cron would never hear."""
    assert ray_main(tmp_path, "--address", "127.0.0.1:1") == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err


def test_a_plain_run_never_imports_ray() -> None:
    """Ray is an extra: `pipeline run` (and everything it imports) works without it."""
    code = (
        "import sys\n"
        "import pipeline.cli, pipeline.run.runner, pipeline.run.host, pipeline.pace.leased\n"
        "import pipeline.pace.actor, pipeline.cluster.driver\n"  # even these only name it
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_probes_a_killed_driver_left_are_swept_and_a_running_checks_are_not(tmp_path: Path) -> None:
    from pipeline.cluster.nodes import PROBE, PROBE_TIMEOUT, sweep_probes

    old, fresh = tmp_path / f"{PROBE}aaaa", tmp_path / f"{PROBE}bbbb-node"
    for probe in (old, fresh):
        probe.write_text("token")
    then = time.time() - 3 * PROBE_TIMEOUT  # a driver killed during its check, long ago
    os.utime(old, (then, then))
    assert sweep_probes(tmp_path) == 1
    assert not old.exists()
    assert fresh.exists()  # another driver's check, under way now
