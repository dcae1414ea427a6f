"""What the built-in mock counted: answers by job, statuses, what its limits let through
(`GET /mock/stats` serves it; tests read it in-process)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.mock.admission import Admission
from pipeline.mock.config import MockConfig
from pipeline.mock.prefixcache import PrefixCache

SERVED = ("prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens", "cost")


@dataclass
class BatchTally:
    """What the batch APIs were given and answered (`pipeline.mock.batches`)."""

    files_uploaded: int = 0
    files_alive: int = 0  # uploaded or made, and not deleted: what a run leaves at the provider
    created: int = 0
    by_tag: Counter[str] = field(default_factory=Counter)  # batches made per tag their metadata sent
    failed_validation: int = 0
    cancels: int = 0
    deleted: int = 0  # batches deleted (the inline shape's DELETE batches/{id})
    refused: Counter[str] = field(default_factory=Counter)  # uploads and creations refused, by status
    answered: Counter[str] = field(default_factory=Counter)  # answers (200) per custom_id, across batches
    failed_lines: int = 0  # answered with an error status
    never_run: int = 0  # expired or cancelled before their turn
    hung: Counter[str] = field(default_factory=Counter)  # calls held (`MockConfig.batch_hang`)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)  # set when one is (tests await it)

    def stats(self) -> dict[str, Any]:
        return {
            "files_uploaded": self.files_uploaded,
            "files_alive": self.files_alive,
            "batches_created": self.created,
            "batches_by_tag": dict(self.by_tag),
            # a tag made into more than one batch: a submission paid twice
            "tags_twice": sum(1 for n in self.by_tag.values() if n > 1),
            "failed_validation": self.failed_validation,
            "cancels": self.cancels,
            # made and not deleted: what a run leaves at the provider (inline shape)
            "batches_alive": self.created - self.deleted,
            "submissions_refused": dict(self.refused),
            "lines_answered": sum(self.answered.values()),
            "lines_answered_twice": sum(1 for n in self.answered.values() if n > 1),
            "lines_failed": self.failed_lines,
            "lines_never_run": self.never_run,
            "hung": dict(self.hung),
        }


@dataclass
class MockState:
    config: MockConfig
    rng: random.Random
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # successes per job (by messages)
    lost_answers: Counter[str] = field(default_factory=Counter)  # made, then the connection dropped
    admission: Admission = field(init=False)  # the rate limits, and what each let through
    stalled: set[str] = field(default_factory=set)
    refused_jobs: Counter[str] = field(default_factory=Counter)  # scattered 429s, per job
    in_flight: int = 0
    max_in_flight: int = 0
    batch: BatchTally = field(default_factory=BatchTally)
    prefix_cache: PrefixCache | None = field(init=False)
    # the usage of the answers delivered (SERVED): what a bench reads the share cached from
    served: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SERVED, 0))

    def __post_init__(self) -> None:
        cfg = self.config
        self.prefix_cache = (
            PrefixCache(
                size=cfg.prefix_cache,
                ttl=cfg.prefix_cache_ttl,
                min_tokens=cfg.prefix_cache_min_tokens,
                clock=cfg.clock,
            )
            if cfg.prefix_cache
            else None
        )
        self.admission = Admission(
            style=cfg.limit_style,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            count=cfg.tpm_count,
            capacity=cfg.bucket_capacity,
            quota=cfg.quota,
            model_rpm=cfg.model_rpm,
            model_tpm=cfg.model_tpm,
            changes=cfg.limit_changes,
            way=cfg.wait_said,
            clock=cfg.clock,
        )

    def delivered(self, usage: dict[str, Any]) -> None:
        """Count an answer's usage as served."""
        details = usage.get("prompt_tokens_details") or {}
        for name in SERVED:
            value = usage.get(name, details.get(name, 0))
            self.served[name] += value if isinstance(value, int | float) else 0

    @property
    def accepted_per_second(self) -> Counter[int]:
        return self.admission.accepted_per_second

    @property
    def refused_per_second(self) -> Counter[int]:
        return self.admission.refused_per_second

    def stats(self) -> dict[str, Any]:
        return {
            **self.admission.stats(),
            "statuses": dict(self.statuses),
            "answered": sum(self.answered.values()),
            "answered_twice": sum(
                1 for k, v in self.answered.items() if v > 1 and k not in self.lost_answers
            ),
            "lost_answers": sum(self.lost_answers.values()),
            # the most scattered 429s one job met: the Retry-Afters any client had to wait in a row
            "most_refusals_of_a_job": max(self.refused_jobs.values(), default=0),
            "max_in_flight": self.max_in_flight,
            "served": {k: round(v, 10) if k == "cost" else int(v) for k, v in self.served.items()},
            "batch": self.batch.stats(),
        }
