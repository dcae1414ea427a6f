"""What the built-in mock plays: its latency, faults and limits (`pipeline mock`'s flags)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.mock.names import Change

# aiohttp's default (128) is below the concurrency clients bring: the kernel would drop
# their connection attempts, and each would wait a second to try again.
BACKLOG = 4096
KEEP_ALIVE = 0.2  # seconds between the comments of a stream that is thinking


@dataclass
class MockConfig:
    latency: float = 0.0  # seconds before answering
    jitter: float = 0.0  # up to this many seconds more, at random
    # When set, each job's latency is spread from `latency` to this, evenly on a log scale
    # (most answers short, a few long), and the same on every try of that job.
    latency_max: float | None = None
    refusal_latency: float = 0.0  # seconds before a rate limit's 429
    fail_rate: float = 0.0  # 500/502/503
    rate_429: float = 0.0  # scattered 429s, as an upstream provider sends them
    retry_after: float = 1.0  # seconds, sent with every 429
    drop_rate: float = 0.0  # connection closed; half before, half after the answer is made
    malformed_rate: float = 0.0  # 200 with a body that is not a chat completion
    error_200_rate: float = 0.0  # 200 with an error object
    cut_stream_rate: float = 0.0  # a stream that stops before [DONE]
    stall_rate: float = 0.0  # share of jobs whose first stream stops sending but stays open
    think: float = 0.0  # seconds a stream sends only keep-alive comments before its first chunk
    chunk_delay: float = 0.0  # seconds between a stream's chunks: a long answer still arriving
    rpm: float | None = None  # requests per minute, counted as `limit_style` says
    tpm: float | None = None  # tokens per minute, per window, counted as `tpm_count` says
    tpm_count: str = "usage"  # "usage" or "arrival" (pipeline.mock.limits.charged_tokens)
    limit_style: str = "second"  # "second", "minute" or "bucket" (pipeline.mock.limits)
    bucket_capacity: float = 60.0  # seconds of its rate a bucket holds
    model_rpm: dict[str, float] = field(default_factory=dict)  # each model's own limits, counted
    model_tpm: dict[str, float] = field(default_factory=dict)  # for the requests naming it
    limit_changes: tuple[Change, ...] = ()  # rpm set anew during a run (pipeline.mock.admission)
    wait_said: str | None = None  # how a 429 says its wait (names.WAYS); None: the style's way
    quota: int | None = None  # requests, then every one refused until midnight UTC
    ratelimit_headers: bool = False  # send x-ratelimit-* on every answer
    api_key: str | None = None  # when set, any other bearer is answered 401
    credits: int | None = None  # successful answers before every answer is 402
    unknown_models: tuple[str, ...] = ()  # answered 404 model_not_found, as a server does
    cost: bool = True  # report usage.cost
    # A provider's prompt cache (`pipeline.mock.prefixcache`): this many prefixes a model (0: off,
    # and one answer in four says half its prompt was cached), each kept this many seconds after
    # its last use, read only from this many tokens on.
    prefix_cache: int = 0
    prefix_cache_ttl: float = 300.0
    prefix_cache_min_tokens: int = 1024
    # Actions taken first, in order: a status (429, 500...), "ok", "timeout", "drop",
    # "malformed", "error200", "cut", "chatty" (content that ignores response_format),
    # "moderated" (OpenRouter's 403 for flagged input) or "no_quota" (OpenAI's 429 for an
    # account without credit).
    script: list[Any] = field(default_factory=list)
    chatty_when: str | None = None  # every request whose messages contain this is answered "chatty"
    ignore_stream: bool = False  # answer stream: true with one JSON body, as some servers do
    record: bool = False  # keep every request body (tests)
    echo_key: bool = (
        False  # put the caller's Authorization header in error messages, as a careless server would
    )
    seed: int = 0
    clock: Callable[[], float] = (
        time.time
    )  # what the limits, batches and prefix cache count by (tests pass a fake one)
    # The batch APIs (`pipeline.mock.batches`): "files" (OpenAI's), "inline" (OpenRouter's) or
    # "none" (every files and batches path 404, as at an endpoint without one).
    batch_api: str = "files"
    batch_validating: float = 0.0  # seconds a batch is validating
    batch_seconds: float = 0.0  # seconds it is in progress, its lines done evenly across them
    batch_finalizing: float = 0.0  # seconds it is finalizing once every line is done
    batch_cancelling: float = 0.0  # seconds it is cancelling once asked to cancel
    batch_expire_after: float | None = None  # seconds after its creation, it expires with part done
    batch_fail_rate: float = 0.0  # lines answered 500 in the error file, at random (seeded)
    batch_max_lines: int | None = None  # None: 50,000 (files) or 5,000 (inline), as the providers say
    batch_max_bytes: int | None = None  # None: 200 MB
    # Answers given first to the calls that submit (upload, create), in order: a status (429
    # with Retry-After, 500, 401, 402...) or "ok".
    batch_script: list[Any] = field(default_factory=list)
    # Calls held after the mock acted on them, once each, in order (`pipeline.mock.batchhang`):
    # "upload", "create", "look", "content", "results". Tests kill their client there.
    batch_hang: list[str] = field(default_factory=list)
    batch_metadata: bool | None = None  # a batch keeps its metadata; None: files yes, inline no (OpenRouter)
