"""One answer cache, several processes writing and reading it at once (shards): nothing lost
but what the bound evicts, no key twice, the running size true, the file sound."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.cache.store import FILE, AnswerCache

SHARDS = 4
EACH = 150  # answers of its own a shard puts, and as many of the keys all shards share

CHILD = r"""
import hashlib, sys, time
from pathlib import Path
from pipeline.cache.store import Answer, AnswerCache

folder, me, each = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
max_gb = float(sys.argv[4]) if sys.argv[4] != "none" else None
warned = []
cache = AnswerCache(folder, max_gb=max_gb, warn=warned.append)
print("ready", flush=True)
sys.stdin.readline()  # all shards start at once

def k(name):
    return hashlib.sha256(name.encode()).digest()

own_read = shared_read = 0
for start in range(0, each, 10):
    for i in range(start, start + 10):
        text = b" ".join(b"word%d" % ((i * 7 + j) % 97) for j in range(60))
        cache.put(k(f"own-{me}-{i}"), Answer(b'{"who":%d,"i":%d,"text":"%s"}' % (me, i, text), "m", 0.001))
        cache.put(k(f"shared-{i}"), Answer(b'{"who":%d,"i":%d,"text":"%s"}' % (me, i, text), "m", 0.001))
    cache.flush()  # (the queue is empty now: what get finds, it reads from the file)
    own_read += sum(cache.get(k(f"own-{me}-{i}")) is not None for i in range(start, start + 10))
    shared_read += sum(cache.get(k(f"shared-{i}")) is not None for i in range(each))
done = time.time()  # (its last write committed)
cache.close()
print(own_read, shared_read, done, len(warned), warned, flush=True)
"""


def k(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@pytest.mark.parametrize("bounded", [False, True])
def test_shards_share_one_cache_at_once(tmp_path: Path, bounded: bool) -> None:
    folder = tmp_path / "cache"
    bound = 100_000 if bounded else None  # (about half of what the shards put)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(folder),
                str(me),
                str(EACH),
                str(bound / 1e9) if bound else "none",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for me in range(SHARDS)
    ]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
        reports.append(out.decode().split(maxsplit=4))
    assert all(warned == "0" for _, _, _, warned, _ in reports), reports

    with sqlite3.connect(folder / FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (bytes_,) = db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()
        (rows,) = db.execute("SELECT value FROM meta WHERE name = 'rows'").fetchone()
        assert (bytes_, rows) == db.execute("SELECT sum(size), count(*) FROM answers").fetchone()
        assert db.execute("SELECT count(DISTINCT key) FROM answers").fetchone() == (rows,)
    cache = AnswerCache(folder)
    if not bounded:
        assert rows == SHARDS * EACH + EACH  # every answer, a shared key once
        assert all(int(own) == EACH for own, _, _, _, _ in reports)  # each read back its own at once
        for i in range(EACH):
            shared = cache.get(k(f"shared-{i}"))
            assert shared is not None
            assert orjson.loads(shared.body)["i"] == i  # one shard's answer, whole
    else:
        assert bytes_ <= bound
        assert rows < SHARDS * EACH  # (evicted, by whichever shard was writing)
        assert bytes_ >= 0.85 * bound  # (evicted to the low mark, not far past it)
        # The newest answers stay: those of the shard that wrote last. (Not every shard's
        # newest: one that finished early may have written before as many bytes as the
        # bound holds came from the others, and its newest is then rightly among the oldest.)
        last = max(range(SHARDS), key=lambda me: float(reports[me][2]))
        assert cache.get(k(f"own-{last}-{EACH - 1}")) is not None
    cache.close()
