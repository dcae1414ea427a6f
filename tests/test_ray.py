"""`pipeline ray` on a real local Ray cluster of several nodes (tests/raycluster.py), against the
mock, measuring the limit the shards share: the merge equals one process, the limit is held
(stated, found, in tokens, through Redis), its pace actor or a node dies, and the key is
nowhere in what Ray keeps. What measures no limit (a driver stopped or killed, a node refused)
is in tests/test_ray_stops.py, beside the other tests."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline.pace.store import account_key
from pipeline.urls import check_base_url
from tests.conftest import FAKE_KEY, RedisServer, bodies, write_jsonl
from tests.raycluster import RATE, RayCluster, exactly_once, ids, pipeline_usage, ray_run, running_cluster
from tests.test_shared_limit import TOKENS, token_bodies, token_share

# A cluster of three nodes and four shards measuring one shared limit: beside another test
# file on a 2-core machine, a share read 86 % where 90 % is asked (once, in a clean clone).
pytestmark = pytest.mark.alone


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    yield from running_cluster()


def steady(accepted: dict[int, int]) -> float:
    """Requests a second the server took, past the ramp and the stragglers."""
    seconds = [accepted[s] for s in sorted(accepted)][2:-2]
    return sum(seconds) / len(seconds)


async def test_four_shards_on_two_nodes_hold_a_stated_limit_and_merge_as_one_process(
    ray_cluster: RayCluster, mock, make_settings, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(360))
    async with mock(api_key=FAKE_KEY) as (url, _):
        one = await pipeline.run(make_settings(url, input=src, output=tmp_path / "one"))
    async with mock(rpm=RATE * 60, latency=0.02, api_key=FAKE_KEY, echo_key=True) as (url, server):
        proc = await ray_run(
            url, src, tmp_path / "out", ray_cluster.address, "--rpm", str(RATE * 60), key=True
        )
        out, err = await proc.communicate()
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Merged 4 shard(s)" in out
    exactly_once(tmp_path / "out", 360)
    assert ids(tmp_path / "out/results.jsonl") == ids(tmp_path / "one/results.jsonl")
    assert one.succeeded == 360
    assert pipeline_usage(tmp_path / "out")["tokens"] == pipeline_usage(tmp_path / "one")["tokens"]
    assert refused <= 2, refused  # given: 0.5 % at most
    assert steady(accepted) >= RATE * 0.93, accepted
    # Whatever Ray keeps of the run (its logs, the job's metadata and runtime environment)
    # never holds the key, nor does any file the run wrote (the mock echoed it back).
    assert list(ray_cluster.tmp.rglob("worker-*.err"))  # the shards' logs are where we look
    leaks = [p for p in [*ray_cluster.tmp.rglob("*"), *(tmp_path / "out").rglob("*")] if _holds(p, FAKE_KEY)]
    assert leaks == []
    assert FAKE_KEY.encode() not in out + err
    dump = await asyncio.create_subprocess_exec(
        sys.executable, "-c", JOBS, ray_cluster.address, stdout=asyncio.subprocess.PIPE
    )
    jobs, _ = await dump.communicate()
    assert b"pipeline" in jobs  # the driver's job, with its metadata and runtime environment
    assert FAKE_KEY.encode() not in jobs


# What the cluster keeps of every job (what its dashboard shows): entrypoint, metadata,
# runtime environment, config.
JOBS = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(repr(ray._private.state.jobs()))
"""


def _holds(path: Path, text: str) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and text.encode() in path.read_bytes()
    except OSError:
        return False


async def test_four_shards_find_an_unstated_limit_together(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(600))
    async with mock(rpm=RATE * 60, latency=0.02, api_key=FAKE_KEY) as (url, server):
        proc = await ray_run(url, src, tmp_path / "out", ray_cluster.address)
        _, err = await proc.communicate()
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert proc.returncode == 0, err.decode()[-2000:]
    exactly_once(tmp_path / "out", 600)
    # The cluster sees the server full as one. These come while the pace ramps up, a count
    # that does not grow with the job: 11 to 13 of 600 measured alone, up to 24 with the rest of
    # the suite running on the same two cores (the bench's 3,000 requests: 0.5 %).
    assert refused <= 600 * 0.05, refused
    assert steady(accepted) >= RATE * 0.85, accepted


async def test_four_shards_hold_one_token_limit_counted_on_arrival(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    """--tpm is the account's, leased from the pace actor as starts are (the shared pace
    zeroed its token rate: nothing reserved tokens)."""
    n = 400
    src = write_jsonl(tmp_path / "in.jsonl", token_bodies(n))
    tpm = ["--tpm", f"{TOKENS * 60:g}"]
    async with mock(tpm=TOKENS * 60, tpm_count="arrival", latency=0.02, api_key=FAKE_KEY) as (url, server):
        proc = await ray_run(url, src, tmp_path / "out", ray_cluster.address, *tpm)
        _, err = await proc.communicate()
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert proc.returncode == 0, err.decode()[-2000:]
    exactly_once(tmp_path / "out", n)
    assert refused <= n * 0.005, (refused, accepted)
    assert token_share(accepted) >= 0.95, accepted


KILL_ACTOR = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
ray.kill(ray.get_actor(sys.argv[2], namespace="pipeline"), no_restart=False)
"""


# The node the account's pace actor lives on.
ACTOR_NODE = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
actor = ray.get_actor(sys.argv[2], namespace="pipeline")
print(ray._private.state.actors(actor._actor_id.hex())["Address"]["NodeID"])
"""


async def actor_node(address: str, account: str) -> str:
    ask = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ACTOR_NODE, address, account, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await ask.communicate()
    return out.decode().split()[-1]  # after what Ray itself may print


async def test_the_pace_actor_killed_mid_run_shards_go_on_alone_then_rejoin(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(300))
    out = tmp_path / "out"
    async with mock(rpm=RATE * 60, latency=0.05, api_key=FAKE_KEY) as (url, server):
        account = account_key(check_base_url(url), FAKE_KEY)
        proc = await ray_run(url, src, out, ray_cluster.address, "--rpm", str(RATE * 60))
        for _ in range(300):
            if sum(server.state.accepted_per_second.values()) >= 100:
                break
            await asyncio.sleep(0.1)
        killer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILL_ACTOR, ray_cluster.address, account
        )
        assert await killer.wait() == 0
        _, err = await proc.communicate()
        accepted = dict(server.state.accepted_per_second)
    assert proc.returncode == 0, err.decode()[-2000:]
    exactly_once(out, 300)
    assert b"cannot be reached" in err  # said by the shards, shown by the driver
    assert b"is back; pacing together again" in err
    assert max(accepted.values()) <= RATE * 1.1, accepted  # alone, each at its share


async def test_a_shared_limit_in_redis_is_the_clusters_pace_too(
    ray_cluster: RayCluster, redis_server: RedisServer, mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(300))
    async with mock(rpm=RATE * 60, latency=0.02, api_key=FAKE_KEY) as (url, server):
        proc = await ray_run(
            url,
            src,
            tmp_path / "out",
            ray_cluster.address,
            "--rpm",
            str(RATE * 60),
            "--shared-limit",
            redis_server.url,
        )
        _, err = await proc.communicate()
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert proc.returncode == 0, err.decode()[-2000:]
    exactly_once(tmp_path / "out", 300)
    assert refused == 0
    assert steady(accepted) >= RATE * 0.9, accepted
    import redis

    keys = [k.decode() for k in redis.Redis.from_url(redis_server.url).keys("pipeline:pace:*")]
    assert account_key(check_base_url(url), FAKE_KEY) in keys  # the pace was Redis's, not an actor's


# The test that takes a node away comes last: a node removed is found dead only some 15 s
# later, and until then the next driver's check of every node waits for it.


async def test_a_node_removed_mid_run_loses_and_doubles_nothing(
    ray_cluster: RayCluster, mock, tmp_path: Path
) -> None:
    spare = ray_cluster.add_node()  # room for the shards Ray runs again
    src = write_jsonl(tmp_path / "in.jsonl", bodies(480))
    out = tmp_path / "out"
    async with mock(rpm=RATE * 60, latency=0.05, api_key=FAKE_KEY) as (url, server):
        account = account_key(check_base_url(url), FAKE_KEY)
        proc = await ray_run(url, src, out, ray_cluster.address, "--rpm", str(RATE * 60))
        victim = None
        for _ in range(200):
            await asyncio.sleep(0.1)
            if len(server.state.accepted_per_second) >= 4 and (victim := ray_cluster.node_running_a_shard()):
                break
        assert victim is not None, "no node was seen running a shard"
        ray_cluster.remove_node(victim)
        _, err = await proc.communicate()
        refused = sum(server.state.refused_per_second.values())
        accepted = dict(server.state.accepted_per_second)
        seen = f"refused {dict(server.state.refused_per_second)}, accepted {accepted}; {err.decode()[-3000:]}"
    assert proc.returncode == 0, err.decode()[-2000:]
    exactly_once(out, 480)
    usage = [pipeline_usage(out / f"shard-{k}-of-4") for k in range(1, 5)]
    assert max(len(u["timeline"]) for u in usage) >= 2  # a shard was run again (a stretch a run), and resumed
    assert refused <= 480 * 0.02, seen
    assert max(accepted.values()) <= RATE * 1.15, seen  # the limit held through it
    # The pace lived through it: made on the driver's node (here the head), not on a worker's.
    assert await actor_node(ray_cluster.address, account) == ray_cluster.cluster.head_node.node_id
    assert b"cannot be reached" not in err
    assert spare is not None
