"""One `pipeline mock` process on 127.0.0.1, started fresh per client run so that its
counters (GET /mock/stats) are that client's alone."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

PIPELINE = str(Path(sys.executable).parent / "pipeline")
_START_TIMEOUT = 15.0


@dataclass(frozen=True, kw_only=True)
class MockFlags:
    """The mock's switches, as `pipeline mock` spells them."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    latency_max_ms: float | None = None  # each job's latency spread up to this (log scale)
    refusal_latency_ms: float = 0.0
    fail_rate: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    error_rate: float = 0.0
    stall_rate: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    tpm_count: str = "usage"  # or "arrival": the prompt and max_tokens, as OpenAI counts
    limit_style: str = "second"
    bucket_capacity: float = 60.0  # seconds of its rate a bucket holds
    wait_said: str | None = None  # how a limit's 429 says its wait (pipeline.mock.names.WAYS)
    model_rpm: tuple[tuple[str, float], ...] = ()  # (model, rpm): its own limit, beside --rpm
    limit_changes: tuple[str, ...] = ()  # as --limit-changes spells each: "[MODEL:]T=RPM,..."
    ratelimit_headers: bool = False
    batch_api: str | None = None  # "files" or "inline": the batch API served (None: the default's)
    batch_validating: float = 0.0  # seconds a batch spends in each state
    batch_seconds: float = 0.0
    batch_finalizing: float = 0.0
    prefix_cache: int = 0  # prefixes a model the mock's prompt cache keeps (0: off)
    prefix_cache_ttl: float = 300.0  # seconds each is kept after its last use
    port: int = 0  # 0: one the system gives; a fixed one keeps the base URL (the answer cache's scope)

    @property
    def batch_time(self) -> float:
        """Seconds from a batch's creation to its results, at the mock."""
        return self.batch_validating + self.batch_seconds + self.batch_finalizing

    def args(self) -> list[str]:
        out: list[str] = []
        for name in (
            "latency_ms",
            "jitter_ms",
            "fail_rate",
            "rate_429",
            "retry_after",
            "drop_rate",
            "malformed_rate",
            "error_rate",
            "refusal_latency_ms",
            "stall_rate",
        ):
            out += [f"--{name.replace('_', '-')}", f"{getattr(self, name):g}"]
        if self.latency_max_ms:
            out += ["--latency-max-ms", f"{self.latency_max_ms:g}"]
        out += ["--limit-style", self.limit_style, "--bucket-capacity", f"{self.bucket_capacity:g}"]
        if self.wait_said:
            out += ["--wait-said", self.wait_said]
        for model, rpm in self.model_rpm:
            out += ["--model-rpm", f"{model}={rpm:g}"]
        for change in self.limit_changes:
            out += ["--limit-changes", change]
        if self.rpm:
            out += ["--rpm", f"{self.rpm:g}"]
        if self.tpm:
            out += ["--tpm", f"{self.tpm:g}", "--tpm-count", self.tpm_count]
        if self.ratelimit_headers:
            out.append("--ratelimit-headers")
        if self.prefix_cache:
            out += [
                "--prefix-cache",
                str(self.prefix_cache),
                "--prefix-cache-ttl",
                f"{self.prefix_cache_ttl:g}",
            ]
        if self.batch_api:
            out += ["--batch-api", self.batch_api]
            for name in ("validating", "seconds", "finalizing"):
                out += [f"--batch-{name}", f"{getattr(self, f'batch_{name}'):g}"]
        return out

    def describe(self) -> str:
        if self.latency_max_ms:
            parts = [f"latency {self.latency_ms / 1000:g} to {self.latency_max_ms / 1000:g} s (log-uniform)"]
        elif self.latency_ms >= 1000:
            parts = [f"latency {self.latency_ms / 1000:g} s"]
        else:
            parts = [f"latency {self.latency_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"jitter {self.jitter_ms:g} ms")
        faults = {
            "5xx": self.fail_rate,
            "429": self.rate_429,
            "drops": self.drop_rate,
            "malformed": self.malformed_rate,
            "errors in 200": self.error_rate,
            "streams stalling": self.stall_rate,
        }
        parts += [f"{rate:.0%} {name}" for name, rate in faults.items() if rate]
        if self.rate_429:
            parts.append(f"Retry-After {self.retry_after:g} s")
        style = {
            "second": "counted per second",
            "minute": "counted per minute",
            "bucket": f"a bucket holding {self.bucket_capacity:g} s",
        }.get(self.limit_style, self.limit_style)
        if self.rpm:
            parts.append(f"limit {self.rpm:g}/min, {style}")
        parts += [f"{model} limited to {rpm:g}/min" for model, rpm in self.model_rpm]
        if self.limit_changes:
            parts.append(f"limit changes {' '.join(self.limit_changes)} (s after the first request=rpm)")
        if self.tpm:
            counted = (
                "on arrival (prompt + max_tokens)" if self.tpm_count == "arrival" else "as answers use them"
            )
            parts.append(f"--tpm {self.tpm:g} counted {counted}")
        if self.wait_said and (self.rpm or self.tpm or self.model_rpm):
            parts.append(f"waits said: {self.wait_said}")
        if self.prefix_cache:
            parts.append(
                f"a prompt cache of {self.prefix_cache} prefixes a model, each kept {self.prefix_cache_ttl:g} s"
            )
        if self.batch_api:
            parts.append(
                f"{self.batch_api} batches, {self.batch_validating:g} s validating, {self.batch_seconds:g} s"
                f" in progress, {self.batch_finalizing:g} s finalizing"
            )
        return ", ".join(parts)


@dataclass
class Mock:
    url: str  # the base URL, ending in /v1
    process: subprocess.Popen[bytes]
    stats_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.stats_url = self.url.removesuffix("/v1") + "/mock/stats"

    def stats(self, *, jobs: bool = False) -> dict[str, Any]:
        """The mock's counters; `jobs`: with every job's answers by its key (`job_key`)."""
        with urllib.request.urlopen(self.stats_url + ("?jobs=1" if jobs else ""), timeout=10) as response:
            doc: dict[str, Any] = orjson.loads(response.read())
        return doc

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


@contextmanager
def running_mock(flags: MockFlags, *, log: Path) -> Iterator[Mock]:
    """The mock, its output in `log` (aiohttp logs a traceback for every client that hangs up
    mid-request, as a killed client does)."""
    with tempfile.TemporaryDirectory(prefix="bench-mock-") as tmp, log.open("wb") as out:
        port_file = Path(tmp) / "port"
        cmd = [
            PIPELINE,
            "mock",
            "--port",
            str(flags.port),
            "--port-file",
            str(port_file),
            "--quiet",
            *flags.args(),
        ]
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            # The mock announces itself only through the port file, so look for it; a
            # harness may poll where the product may not.
            deadline = time.monotonic() + _START_TIMEOUT
            while not port_file.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"the mock exited with {process.returncode}: {' '.join(cmd)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the mock did not start within {_START_TIMEOUT:g} s")
                time.sleep(0.05)
            yield Mock(url=f"http://127.0.0.1:{int(port_file.read_text())}/v1", process=process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
