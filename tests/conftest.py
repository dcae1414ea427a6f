"""One fake server for every test: the built-in mock, started in-process on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.mock.server import MockConfig, MockServer, start_mock
from pipeline.settings import Settings, build

FAKE_KEY = "sk-test-SECRET-0123456789abcdefXYZ"


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
