"""`pipeline estimate`: read and check every line as `run` would, count the requests, their
tokens and what they may cost, and send nothing.

Prompt tokens are counted exactly (o200k_base); completion tokens are the most each request
allows (`max_tokens` times `n`, or 4,096 where it sets no limit). The cost range runs from
the prompts alone (every reply empty) to every reply at its limit, at the job's `[prices]`;
at `--tier batch`, the batch price beside it (`account.cost.tier_prices`).
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import orjson

from pipeline.account.cost import money, price_for, priced, tier_prices, unpriced_batches
from pipeline.errors import SettingsError
from pipeline.input.line import LineParser
from pipeline.input.reader import ReadCounts, read_requests
from pipeline.input.source import check_input
from pipeline.input.stdin import named
from pipeline.input.tokens import DEFAULT_MAX_COMPLETION
from pipeline.job import Failure
from pipeline.output.folder import LEDGER, RESULTS
from pipeline.output.ledger import Ledger
from pipeline.prices import Price
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.cache.peek import Peek
    from pipeline.output.redo import Selection

MAX_LISTED = 20


@dataclass
class ModelEstimate:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0  # at most
    unlimited: int = 0  # requests without max_tokens


@dataclass
class Estimate:
    settings: Settings
    counts: ReadCounts = field(default_factory=ReadCounts)
    models: dict[str, ModelEstimate] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    invalid: int = 0
    cached: Peek | None = None  # `--cache DIR`: the requests it answers, not counted above
    redo: Selection | None = None  # with --redo: what it would send again

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.models.values())

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers whose cost is shown: the synchronous price, and the batch price beside it."""
        return ("sync", "batch") if self.settings.tier == "batch" else ("sync",)

    def cost_range(self, model: str, m: ModelEstimate, tier: str = "sync") -> tuple[float, float] | None:
        price = price_for(tier_prices(self.settings.prices, tier), model)
        if price is None:
            return None
        return priced(price, m.prompt_tokens, 0), priced(price, m.prompt_tokens, m.completion_tokens)


def _done_in(folder: Path) -> sqlite3.Connection | None:
    """Ids already in the output folder's results, read without touching the folder."""
    path = folder / LEDGER
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def estimate(settings: Settings) -> Estimate:
    check_input(settings.input)
    result = Estimate(settings)
    parser = LineParser(settings, every_token=True)
    done = _done_in(settings.folder) if settings.output is not None else None
    again: set[str] = set()
    if settings.redo is not None:
        if done is None:
            raise SettingsError(
                f"--redo sends again lines of a folder a run wrote: {settings.output or 'no --output'} "
                "holds none; give the run's --output"
            )
        result.redo = _redo(settings, done)
        again = {row[0] for row in result.redo.rows}

    def is_done(custom_id: str) -> bool:
        if done is None or custom_id in again:
            return False
        return done.execute("SELECT 1 FROM done WHERE id = ?", (custom_id,)).fetchone() is not None

    cached = result.cached = _peek(settings)
    with tempfile.TemporaryDirectory(prefix="pipeline-estimate-") as scratch:
        ledger = Ledger(Path(scratch) / "ids.sqlite")  # the ids seen, on disk as in a run
        try:
            items = read_requests(settings.input, parser, ledger, result.counts, is_done=is_done)
            for item in items:
                if item is None:
                    continue
                if isinstance(item, Failure):
                    result.invalid += 1
                    if len(result.failures) < MAX_LISTED:
                        result.failures.append(item)
                    continue
                # (a line sent again is sent, whatever the cache holds: a run asks it nothing)
                if cached is not None and item.custom_id not in again and cached.held(item):
                    continue
                m = result.models.setdefault(item.model, ModelEstimate())
                m.requests += 1
                m.prompt_tokens += item.prompt_tokens
                m.completion_tokens += item.max_completion_tokens
                m.unlimited += not item.bounded
        finally:
            ledger.close()
            if done is not None:
                done.close()
            if cached is not None:
                cached.close()
    return result


def _peek(settings: Settings) -> Peek | None:
    """The answer cache, read only, where the job names one."""
    if settings.cache is None:
        return None
    from pipeline.cache.peek import Peek
    from pipeline.send.reuse import scope_of
    from pipeline.send.verdict import compile_verdict

    verdict = None
    if settings.verdict is not None:
        verdict = compile_verdict(settings.verdict, settings.request, where=str(settings.job_file))
    return Peek(settings.cache, scope=scope_of(settings.base_url), verdict=verdict)


def _cached(cached: Peek, rest: int) -> str:
    """What the answer cache takes off the estimate."""
    if cached.note is not None:
        return f"--cache: {cached.note}"
    unknown = f" ({cached.unpriced:,} of them of no known cost)" if cached.unpriced else ""
    return (
        f"--cache {cached.folder}: {cached.hits:,} requests have their answer there, taken, not sent: "
        f"{money(cached.cost)} not to be spent (what they cost when bought){unknown}; "
        + (f"the figures above are the other {rest:,}" if rest else "nothing else is to be sent")
    )


def _redo(settings: Settings, done: sqlite3.Connection) -> Selection:
    """What `--redo` would choose in the folder, read only (as a run would, but for an index
    a killed run left behind its file: the lines it has not seen are not chosen)."""
    from pipeline.output.redo import chosen_before, select

    assert settings.redo is not None
    verdict = None
    if settings.verdict is not None:
        from pipeline.send.verdict import compile_verdict

        verdict = compile_verdict(settings.verdict, settings.request, where=str(settings.job_file))
    row = done.execute("SELECT value FROM meta WHERE key = 'results_offset'").fetchone()
    offset = int(orjson.loads(row[0]) or 0) if row else 0
    before = chosen_before(done)
    failures = (
        (str(k), str(kind), bytes(r)) for k, kind, r in done.execute("SELECT key, kind, record FROM failed")
    )
    return select(
        settings.folder / RESULTS,
        offset,
        settings.redo,
        counted=lambda custom_id: custom_id not in before,
        failures=failures,
        verdict=verdict,
        prices=settings.prices,
        mine=None if settings.shard is None else settings.shard.owns,
    )


def _priced_as(prices: Mapping[str, Price], model: str) -> str | None:
    """The key of `prices` that prices `model`: `price_for`'s spellings, in its order."""
    return next(
        (key for key in (model, model.removeprefix("openrouter/"), f"openrouter/{model}") if key in prices),
        None,
    )


def print_estimate(result: Estimate, *, out: TextIO | None = None, err: TextIO | None = None) -> None:
    out, err = out or sys.stdout, err or sys.stderr  # as they are now, not at import
    settings, counts = result.settings, result.counts
    source = named(settings.input)
    for failure in result.failures:
        print(f"{source}:{failure.line}: {failure.message}", file=err)
    if result.invalid > len(result.failures):
        print(f"{source}: {result.invalid - len(result.failures):,} more invalid lines", file=err)
    if result.redo is not None and settings.redo is not None:
        chosen = result.redo
        warning = chosen.warning(settings.redo)
        if warning:
            print(f"pipeline: warning: {warning}", file=err)
        why = ", ".join(f"{reason} {n:,}" for reason, n in chosen.reasons.items())
        print(
            f"--redo {settings.redo.what}: {chosen.lines:,} line(s) would go again"
            + (
                f" ({why}); the answers they replace cost {money(chosen.superseded_cost)}"
                if chosen.lines
                else ""
            )
            + "; the requests below count them, at the settings given now",
            file=out,
        )
    print(
        f"{source}: {counts.read:,} lines: {result.requests:,} requests to send, "
        + (f"{counts.skipped:,} already done in {settings.output}, " if settings.output is not None else "")
        + f"{result.invalid:,} invalid, "
        f"{counts.empty:,} empty",
        file=out,
    )
    tiers = result.tiers
    headers = ("cost",) if tiers == ("sync",) else ("sync cost", "batch cost")
    rows = [("model", "requests", "prompt tokens", "completion tokens (at most)", *headers)]
    totals = {tier: [0.0, 0.0] for tier in tiers}
    unpriced: dict[str, list[str]] = {tier: [] for tier in tiers}
    unlimited = 0
    at_sync_price, batch_prices = unpriced_batches(settings.prices), tier_prices(settings.prices, "batch")
    for model, m in sorted(result.models.items()):
        cells = []
        for tier in tiers:
            cost = result.cost_range(model, m, tier)
            if cost is None:
                unpriced[tier].append(model)
                cells.append("no price")
                continue
            totals[tier][0] += cost[0]
            totals[tier][1] += cost[1]
            # Settings warned of it too; by the key that prices it (openrouter/m is priced as m).
            upper = tier == "batch" and _priced_as(batch_prices, model) in at_sync_price
            cells.append(f"{money(cost[0])} to {money(cost[1])}" + (" (sync price)" if upper else ""))
        unlimited += m.unlimited
        rows.append((model, f"{m.requests:,}", f"{m.prompt_tokens:,}", f"{m.completion_tokens:,}", *cells))
    if len(result.models) > 1:
        prompt = sum(m.prompt_tokens for m in result.models.values())
        completion = sum(m.completion_tokens for m in result.models.values())
        cells = [
            f"{money(totals[tier][0])} to {money(totals[tier][1])}"
            + (" (priced models only)" if unpriced[tier] else "")
            for tier in tiers
        ]
        rows.append(("all", f"{result.requests:,}", f"{prompt:,}", f"{completion:,}", *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        aligned = (
            c.ljust(w) if i == 0 or i >= 4 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print(("  " + "  ".join(aligned)).rstrip(), file=out)
    if unlimited:
        print(
            f"{unlimited:,} requests set no max_tokens: each is counted at {DEFAULT_MAX_COMPLETION:,} completion "
            "tokens at most",
            file=out,
        )
    if result.cached is not None:
        print(_cached(result.cached, result.requests), file=out)
    # A model the run's tier cannot price: at the batch tier, what the batch price lacks.
    for model in unpriced[tiers[-1]]:
        print(
            f'no price for {model}: add [prices."{model}"] prompt = ..., completion = ... '
            "(dollars per million tokens) to the job file to see its cost",
            file=out,
        )
