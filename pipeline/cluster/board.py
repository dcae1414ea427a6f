"""What the driver of `pipeline ray` shows: the shards as one job, and who tells it where they stand.

`Coordinator` is a Ray actor the driver owns (it dies with it): each shard reports its
figures and what it said to it twice a second, and hears back whether to stop. `Board`
reads it and draws one bar for the whole job on a terminal, else a log line now and then.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Never

from pipeline.account.cost import money
from pipeline.run.progress import duration

if TYPE_CHECKING:
    from tqdm import tqdm


class Coordinator:
    """The actor's body: the shards' last figures, what they said, and the stop asked for."""

    def __init__(self) -> None:
        self.level = 0  # 0 go on; 1 stop as a first Ctrl-C; 2 as a second
        self.figures: dict[int, dict[str, Any]] = {}
        self.said: list[tuple[int, str]] = []

    def report(self, k: int, figures: dict[str, Any], said: list[str]) -> int:
        self.figures[k] = figures
        self.said += [(k, text) for text in said]
        return self.level

    def stop(self, level: int) -> None:
        self.level = max(self.level, level)

    def take(self) -> tuple[dict[int, dict[str, Any]], list[tuple[int, str]]]:
        said, self.said = self.said, []
        return self.figures, said


class Board:
    def __init__(self, shards: int, *, quiet: bool, interval: float) -> None:
        self.shards = shards
        self.interval = interval
        self.started = time.monotonic()
        self._line_at = self.started
        self._done: dict[int, int] = {}  # a shard run again reads its lines again: never back
        self.figures: dict[int, dict[str, Any]] = {}
        self.bar: tqdm[Never] | None = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def show(self, figures: dict[int, dict[str, Any]], said: list[tuple[int, str]]) -> None:
        for k, text in said:
            self.say(f"shard {k}/{self.shards}: {text}")
        self.figures = figures
        for k, f in figures.items():
            self._done[k] = max(self._done.get(k, 0), f["done"])
        done = sum(self._done.values())
        total = self._total()
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(done - self.bar.n)
        elif time.monotonic() - self._line_at >= self.interval:
            self._line_at = time.monotonic()
            of = f"{done:,} of {total:,} done ({done / total:.0%})" if total else f"{done:,} done"
            elapsed = duration(time.monotonic() - self.started)
            print(f"pipeline ray: {of} in {elapsed} | {self._postfix()}", file=sys.stderr, flush=True)

    def _total(self) -> int | None:
        """Lines of the input to do (every shard counts them all), once every shard has said."""
        totals = [f["total"] - f["empty"] for f in self.figures.values() if f["total"] is not None]
        return max(totals) if totals and len(self.figures) == self.shards else None

    def pending(self, results: dict[int, dict[str, Any]]) -> int | None:
        """Lines of the input not done: the shards' own counts when every one read its input to
        the end, else the lines not done of those they all read, by their last reports."""
        ended = [r for r in results.values() if r.get("exit") in (0, 1) and r.get("pending") is not None]
        if len(ended) == self.shards:
            return sum(int(r["pending"]) for r in ended)
        total = self._total()
        if total is None:
            return None
        done = 0
        for k in range(1, self.shards + 1):
            r = results.get(k, {})
            if "skipped" in r:
                done += r["skipped"] + r["succeeded"] + r["failed"] + r["invalid_input"]
            else:
                done += self._done.get(k, 0)
        return max(total - done, 0)

    def _postfix(self) -> str:
        figures = list(self.figures.values())
        paced = [f for f in figures if f["pace"]]
        if paced:  # each model's pace beside the account's, as the shards share them
            pace = paced[0].get("paces") or f"pace {paced[0]['pace'] * 60:,.0f}/min ({paced[0]['kind']})"
        else:  # a model's may be in force while the account's is not
            pace = next((f["paces"] for f in figures if f.get("paces") not in (None, "unpaced")), "unpaced")
        costs = [f["cost"] for f in figures if f["cost"] is not None]
        cost = money(sum(costs), unknown="cost not reported") if costs else "cost not reported"
        return (
            f"{len(self.figures)}/{self.shards} shards reporting, {pace}, "
            f"{sum(f['refused'] for f in figures):,} 429s in the last minute, "
            f"{sum(f['tokens'] for f in figures):,} tokens, {sum(f['failed'] for f in figures):,} failed, {cost}"
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
