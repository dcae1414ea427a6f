"""Prometheus metrics while a run goes (`--metrics-port PORT`), for a cluster's monitoring.

Nothing is counted for them. A scrape reads the figures the run keeps anyway, as the progress
bar does: the usage totals and their latency histograms, the lines read and written, the
requests in flight, the paces in force. So a request pays nothing for them, with the flag or
without, and they agree with what usage.json will say. The scrape is answered on the run's
own event loop (by aiohttp's server), so it reads the figures between two steps of the run,
never halfway through one; prometheus_client (the `metrics` extra) only formats them, in a
registry of the run's own, and is imported only when the flag is given.

The counters count this process's run (earlier runs into the folder are in its usage.json):
a pod started again starts them at 0, as Prometheus expects of a process. The lines done and
pending are the folder's, as the bar's "N of M done" are.

    pipeline_requests_total{status}                  attempts answered: "200", "429", "503", "timeout", ...
    pipeline_results_total{outcome}                  lines ended: succeeded, failed, invalid_input
    pipeline_answers_total                           answers paid for (kept, or thrown away by the verdict)
    pipeline_answers_uncosted_total                  of those, answers whose cost nobody could tell
    pipeline_reused_total                            results taken from the answer cache, not paid
    pipeline_retries_total                           attempts after a line's first (a 429 spends none)
    pipeline_tokens_total{direction}                 "in" (prompt) and "out" (completion)
    pipeline_cost_usd_total                          dollars, as reported or priced (uncosted answers not in it)
    pipeline_requests_in_flight                      sent and not yet answered
    pipeline_pace_requests_per_second{scope,model}   the pace in force: scope "account" (model ""), or "model"
    pipeline_limit_requests_per_second{scope,model}  the limit it keeps under (given, stated or found)
    pipeline_request_duration_seconds                histogram: a result's latency, from send to its whole answer
    pipeline_time_to_first_token_seconds             histogram: a streamed result's first token
    pipeline_lines_done, pipeline_lines_pending      the input's lines, a shard's own (pending once counted)
    process_*                                        CPU, memory, open files of the process

A scope's pace and limit are absent while it is unpaced. The histograms' buckets (0.1 s to
120 s) are filled from the usage's own (5 % wide), each counted where its middle falls, and
their sum is the middles': both within 2.5 %.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from pipeline.account.histogram import Histogram, bucket, middle
from pipeline.errors import SettingsError
from pipeline.pace.scopes import pace_of

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from pipeline.run.runner import Run
    from pipeline.settings import Settings

INSTALL = "--metrics-port needs prometheus_client: pip install 'chat-pipeline[metrics]' (make installs it)"
BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)  # seconds
OUTCOMES = ("succeeded", "failed", "invalid_input")


def _top(bound: float) -> int:
    """The last of the usage histogram's buckets whose middle is within `bound`."""
    index = bucket(bound)
    while middle(index) > bound:
        index -= 1
    return index


_TOPS = [_top(bound) for bound in BOUNDS]


def _buckets(now: Histogram, before: dict[int, int]) -> tuple[list[tuple[str, float]], float]:
    """This run's part of a usage histogram, as Prometheus' cumulative buckets, and its sum."""
    counts = sorted((index, n - before.get(index, 0)) for index, n in now.counts.items())
    out: list[tuple[str, float]] = []
    seen = 0
    total = 0.0
    i = 0
    for bound, top in zip(BOUNDS, _TOPS, strict=True):
        while i < len(counts) and counts[i][0] <= top:
            seen += counts[i][1]
            total += counts[i][1] * middle(counts[i][0])
            i += 1
        out.append((str(bound), seen))
    for index, n in counts[i:]:
        seen += n
        total += n * middle(index)
    out.append(("+Inf", seen))
    return out, total


class RunCollector:
    """The run's figures, read at each scrape; counters from where they stood as it began."""

    def __init__(self, run: Run) -> None:
        self.run = run
        usage = run.usage
        self.answers = Counter(usage.answers)
        self.outcomes = Counter(usage.outcomes)
        self.totals = usage.totals()
        self.reused, self.retries = usage.reused, usage.retries
        self.latency, self.ttft = dict(usage.latency.counts), dict(usage.ttft.counts)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily as Counted
        from prometheus_client.core import GaugeMetricFamily as Gauge
        from prometheus_client.core import HistogramMetricFamily as Histogrammed

        run = self.run
        usage = run.usage
        requests = Counted(
            "pipeline_requests", "Attempts answered, by status or what ended them", labels=["status"]
        )
        for status in sorted(usage.answers.keys() | self.answers.keys()):
            requests.add_metric([status], usage.answers[status] - self.answers[status])
        yield requests
        results = Counted("pipeline_results", "Lines ended, by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            results.add_metric([outcome], usage.outcomes[outcome] - self.outcomes[outcome])
        yield results
        now, before = usage.totals(), self.totals
        yield Counted(
            "pipeline_answers",
            "Answers paid for (kept, or thrown away)",
            value=now.requests - before.requests,
        )
        yield Counted(
            "pipeline_answers_uncosted",
            "Answers paid for whose cost the server did not report and the job's prices cannot tell",
            value=now.without_cost - before.without_cost,
        )
        yield Counted(
            "pipeline_reused", "Results taken from the answer cache", value=usage.reused - self.reused
        )
        yield Counted("pipeline_retries", "Attempts after a line's first", value=usage.retries - self.retries)
        tokens = Counted("pipeline_tokens", "Tokens of the answers paid for", labels=["direction"])
        tokens.add_metric(["in"], now.prompt_tokens - before.prompt_tokens)
        tokens.add_metric(["out"], now.completion_tokens - before.completion_tokens)
        yield tokens
        yield Counted(
            "pipeline_cost_usd", "Dollars spent, as reported or priced", value=now.cost - before.cost
        )
        yield Gauge(
            "pipeline_requests_in_flight", "Requests sent and not yet answered", value=run.control.in_flight
        )
        # (the account's apart from the models': a model may be named "account")
        paces = [(("account", ""), pace_of(run.finder))]
        paces += [(("model", model), paced) for model, paced in run.gate.scopes.paces().items()]
        labels = ["scope", "model"]
        pace = Gauge("pipeline_pace_requests_per_second", "The pace in force, by scope", labels=labels)
        limit = Gauge("pipeline_limit_requests_per_second", "The limit a pace keeps under", labels=labels)
        for scope, (rate, _, keeps) in paces:
            if rate:
                pace.add_metric(list(scope), rate)
            if keeps:
                limit.add_metric(list(scope), keeps)
        yield pace
        yield limit
        for name, what, histogram, before_counts in (
            ("pipeline_request_duration_seconds", "A result's latency", usage.latency, self.latency),
            (
                "pipeline_time_to_first_token_seconds",
                "A streamed result's first token",
                usage.ttft,
                self.ttft,
            ),
        ):
            buckets, total = _buckets(histogram, before_counts)
            yield Histogrammed(name, what, buckets=buckets, sum_value=total)
        done, lines = run.progress.done(), run.counts.total
        # (a shard's: the bar counts the other shards' lines as done, a pod of a cluster does not)
        own = done - run.counts.elsewhere
        yield Gauge("pipeline_lines_done", "Lines of the input done, by this run or before", value=own)
        if lines is not None:
            yield Gauge(
                "pipeline_lines_pending", "Lines of the input not yet done", value=max(lines - done, 0)
            )


class Metrics:
    """What a scrape reads: the process's figures, and the run's once it has begun."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
        except ImportError:
            raise SettingsError(INSTALL) from None
        self.registry: CollectorRegistry = CollectorRegistry()
        ProcessCollector(registry=self.registry)

    def watch(self, run: Run) -> None:
        self.registry.register(RunCollector(run))

    async def scrape(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Metrics | None]:
    """The metrics served at :PORT/metrics for as long as the run goes (None: not asked for).
    A port that cannot be had is a settings error: said before anything is sent."""
    port = settings.metrics_port
    if port is None:
        yield None
        return
    if not 1 <= port <= 65535:  # (a ray shard's PORT+K-1: on every interface it would wrap, not fail)
        raise SettingsError(f"--metrics-port {port}: not a port (1 to 65535)")
    metrics = Metrics()
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/metrics", metrics.scrape)
    app.router.add_get("/", metrics.scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        # (host None: every interface, IPv4 and IPv6, as a cluster scrapes the pod's own IP)
        site = web.TCPSite(runner, settings.metrics_host, port)
        try:
            await site.start()
        except (OSError, OverflowError) as e:  # (OverflowError: a ray shard's PORT+K-1 past 65535)
            raise SettingsError(_unserved(settings, port, e)) from None
        yield metrics
    finally:
        with anyio.CancelScope(shield=True):  # (a cancelled run's port is let go of too)
            await runner.cleanup()


def _unserved(settings: Settings, port: int, error: OSError | OverflowError) -> str:
    where = f"--metrics-port {port}" + (f" on {settings.metrics_host}" if settings.metrics_host else "")
    if not isinstance(error, OSError):
        return f"{where}: not a port (1 to 65535)"
    if error.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is in use; give another (every process on one machine needs a "
            "port of its own: a shard's, say, PORT+K-1)"
        )
    if error.errno == errno.EACCES:
        return f"{where}: not allowed (a port below 1024 needs root); give one above 1024"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: not an address of this machine; give one of its own, or leave --metrics-host out"
    return f"{where}: cannot serve the metrics there: {error.strerror or error}"
