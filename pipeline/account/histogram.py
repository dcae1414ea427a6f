"""Latency histograms with logarithmic buckets (5 % wide, so a percentile is within about
2.5 %): constant memory whatever the number of answers, and mergeable."""

from __future__ import annotations

import math
from collections.abc import Sequence

_GROWTH = 1.05
_LOG_GROWTH = math.log(_GROWTH)
_MIN = 1e-4  # seconds; faster answers share the first bucket


def bucket(seconds: float) -> int:
    return 0 if seconds <= _MIN else int(math.log(seconds / _MIN) / _LOG_GROWTH) + 1


def middle(index: int) -> float:
    """A bucket's time, as a percentile reads it: the geometric middle of the bucket."""
    return _MIN if index == 0 else float(_MIN * _GROWTH ** (index - 0.5))


class Histogram:
    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = counts or {}
        self.n = sum(self.counts.values())

    def add(self, seconds: float) -> None:
        self.count((bucket(seconds),))

    def count(self, buckets: Sequence[int]) -> None:
        """Times already put in their buckets (one write's results go in two histograms)."""
        counts = self.counts
        for b in buckets:
            counts[b] = counts.get(b, 0) + 1
        self.n += len(buckets)

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = q / 100 * self.n
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return middle(bucket)
        return None

    def merge(self, other: Histogram) -> None:
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.n += other.n

    def state(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_state(cls, state: dict[str, int] | None) -> Histogram:
        return cls({int(k): int(v) for k, v in (state or {}).items()})
