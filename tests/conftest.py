"""One fake server for every test: the built-in mock, started in-process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import settings as hypothesis_settings

from pipeline.mock.hosting import start_mock
from pipeline.mock.server import MockConfig, MockServer
from pipeline.settings import Settings, build

FAKE_KEY = "sk-test-SECRET-0123456789abcdefXYZ"

# Properties (tests/test_properties_*.py): 500 examples each. In CI the same 500 every run
# (a fixed seed), nothing written to an examples database, and no deadline: the machine is
# shared, and a slow example is not a failure. Locally the seed varies, and failures found
# are kept in .hypothesis/ (not in git) to be tried first next time.
hypothesis_settings.register_profile("ci", max_examples=500, derandomize=True, database=None, deadline=None)
hypothesis_settings.register_profile("dev", max_examples=500, deadline=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


# The files that take longest (`--durations`, summed by file), longest first: collected first,
# so that `make test` (--dist loadfile --no-loadscope-reorder: a file to a worker, in this
# order) starts them first, and no long one starts near the end to run on by itself. The rest
# follow by how many tests they hold, as xdist orders them. By xdist's order alone, the
# longest file (test_write_faults, 54 s) started at 60 % of the way.
FIRST = (
    "test_write_faults.py",
    "test_shared_limit.py",
    "test_ray_stops.py",
    "test_report.py",
    "test_properties_input.py",
    "test_scopes.py",
    "test_crash.py",
    "test_readme.py",
    "test_pace_account.py",
    "test_adaptive.py",
    "test_token_count.py",
    "test_batch_faults.py",
    "test_timeouts.py",
    "test_package.py",  # (few tests, so last by xdist's order: a build and a venv, some 10 s)
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    held = Counter(item.path.name for item in items)
    items.sort(key=lambda item: (rank.get(item.path.name, len(FIRST)), -held[item.path.name]))


async def until(holds: Callable[[], bool], *, within: float = 60.0) -> None:
    """Until `holds()` (what a server counted: it signals nothing a test could await), looked
    at every 10 ms. Where a test slept a second for a process to be under way, that process
    may take longer to start on a busy machine, or much less on a quiet one."""
    deadline = time.monotonic() + within
    while not holds():
        assert time.monotonic() < deadline, f"not so within {within:g}s"
        await asyncio.sleep(0.01)


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else orjson.dumps(row))
            f.write(b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def bodies(n: int, *, model: str = "test/model", start: int = 0) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"job-{i}", "model": model, "messages": [{"role": "user", "content": f"question {i}"}]}
        for i in range(start, start + n)
    ]


@pytest.fixture
def mock() -> Callable[..., AbstractAsyncContextManager[tuple[str, MockServer]]]:
    """`async with mock(fail_rate=0.1, ...) as (base_url, server):` (records requests)."""

    def start(**config: Any) -> AbstractAsyncContextManager[tuple[str, MockServer]]:
        config.setdefault("record", True)
        return start_mock(MockConfig(**config))

    return start


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, MockServer]]:
    async with start_mock(MockConfig(record=True)) as started:
        yield started


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings for a test run: fast backoff, no waiting but what a server asks for."""
    monkeypatch.setenv("LUMENFALL_API_KEY", FAKE_KEY)

    def make(base_url: str, rows: Iterable[Any] | None = None, **overrides: Any) -> Settings:
        if rows is not None:
            overrides.setdefault("input", write_jsonl(tmp_path / "input.jsonl", rows))
        overrides.setdefault("output", tmp_path / "out")
        overrides.setdefault("backoff_base", 0.0)
        overrides.setdefault("backoff_max", 0.0)
        overrides.setdefault("timeout", 5.0)
        overrides.setdefault("quiet", True)
        job = overrides.pop("job", None)
        return build(job, base_url=base_url, **overrides)

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port of 127.0.0.1, for this test alone."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RedisServer:
    """Debian's redis-server, started and stopped (and started again) by a test."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            message = (
                "redis-server is not installed: make test installs it (or: sudo apt-get install redis-server)"
            )
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        args += ["--dir", str(self.folder)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
