"""`pipeline run | estimate | mock`: a thin layer over `pipeline.run` and the mock.

Exit status (DESIGN.md): 0 every request succeeded; 1 some ended failed; 2 the command or
job file is wrong and nothing was sent; 3 the run stopped early for a person to act, and can be
resumed; 130 interrupted, and can be resumed; 70 a bug in pipeline (resumable too).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Any

import anyio

from pipeline.account.cost import money
from pipeline.errors import RunStopped, SettingsError
from pipeline.mock.limits import STYLES
from pipeline.run.progress import duration
from pipeline.run.runner import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USAGE, Summary, run_sync
from pipeline.settings import DEFAULT_BASE_URL, DEFAULT_KEY_ENV, Settings, build

EXIT_BUG = 70  # EX_SOFTWARE: neither the user's nor the server's doing


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1")
    return value


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", type=Path, help="a job file (TOML); flags override its keys")
    p.add_argument("--input", help="the input file: .jsonl or .jsonl.gz")
    p.add_argument("--output", help="the output folder; {date} becomes today's date")
    p.add_argument("--base-url", help=f"the endpoint (default {DEFAULT_BASE_URL})")
    p.add_argument(
        "--api-key-env", help=f"the environment variable holding the key (default {DEFAULT_KEY_ENV})"
    )
    p.add_argument("--model", help="the model for lines that name none")
    p.add_argument("--concurrency", type=_positive_int, help="requests in flight at most (default 64)")
    p.add_argument("--rpm", type=_positive_float, help="requests per minute the endpoint allows")
    p.add_argument("--tpm", type=_positive_float, help="tokens per minute the endpoint allows")
    p.add_argument(
        "--max-attempts",
        type=_positive_int,
        help="attempts per request, first included; a 429 spends none (default 8)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        help="seconds an answer that is not streamed may take, whole (default 600: long reasoning "
        "answers send nothing until they are done)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_float,
        help="seconds a streamed answer may send nothing before it is cut and sent again (default 60)",
    )
    p.add_argument(
        "--give-up-after",
        type=_positive_float,
        help="seconds of nothing but 429s before the run stops with exit 3, to resume later (default 600)",
    )
    p.add_argument(
        "--max-cost", type=_positive_float, help="stop dispatching before spending more dollars than this"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pipeline", description="Batches of chat completions, run to the end.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a job", description="Run every line of the input; resume where a run stopped."
    )
    _job_arguments(run)
    run.add_argument(
        "--fresh", action="store_true", default=None, help="start over: move the folder's old files aside"
    )
    run.add_argument(
        "--quiet", action="store_true", default=None, help="no bar: a log line a minute and a summary (cron)"
    )

    est = sub.add_parser(
        "estimate",
        help="count requests, tokens and cost, sending nothing",
        description="Read and check every line as run would; count tokens and cost; send nothing.",
    )
    _job_arguments(est)

    mock = sub.add_parser("mock", help="serve the built-in OpenAI-compatible endpoint")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    mock.add_argument("--port-file", help="write the port here once listening")
    mock.add_argument("--latency-ms", type=float, default=0.0, help="milliseconds before each answer")
    mock.add_argument(
        "--jitter-ms", type=float, default=0.0, help="up to this many milliseconds more, at random"
    )
    mock.add_argument(
        "--latency-max-ms",
        type=float,
        help="spread each job's latency from --latency-ms to this, evenly on a log scale "
        "(short answers and long reasoning ones; a job keeps its own)",
    )
    mock.add_argument(
        "--refusal-latency-ms", type=float, default=0.0, help="milliseconds before a rate limit's 429"
    )
    mock.add_argument("--fail-rate", type=_rate, default=0.0, help="fraction answered 500")
    mock.add_argument("--rate-429", type=_rate, default=0.0, help="fraction answered 429 at random")
    mock.add_argument("--retry-after", type=float, default=1.0, help="seconds sent with each 429")
    mock.add_argument("--drop-rate", type=_rate, default=0.0, help="fraction of connections dropped")
    mock.add_argument("--malformed-rate", type=_rate, default=0.0, help="fraction of malformed 200 bodies")
    mock.add_argument("--error-rate", type=_rate, default=0.0, help="fraction of errors inside a 200")
    mock.add_argument("--cut-rate", type=_rate, default=0.0, help="fraction of streams cut short")
    mock.add_argument(
        "--stall-rate",
        type=_rate,
        default=0.0,
        help="fraction of jobs whose first stream stops after one chunk and stays open",
    )
    mock.add_argument("--rpm", type=float, help="enforce requests per minute (see --limit-style)")
    mock.add_argument("--tpm", type=float, help="enforce tokens per minute (per window)")
    mock.add_argument(
        "--limit-style",
        choices=STYLES,
        default="second",
        help="second: rpm/60 per wall-clock second; minute: rpm per wall-clock minute; bucket: a "
        "minute's quota at once, refilled continuously, each 429 saying 'try again in Nms'",
    )
    mock.add_argument("--quota", type=int, help="requests, then every one refused until midnight UTC")
    mock.add_argument("--ratelimit-headers", action="store_true", help="send x-ratelimit-* headers")
    mock.add_argument("--no-cost", action="store_true", help="leave usage.cost out")
    mock.add_argument("--seed", type=int, default=0)
    mock.add_argument("--quiet", action="store_true")
    return top


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in (
            "input",
            "output",
            "base_url",
            "api_key_env",
            "model",
            "concurrency",
            "rpm",
            "tpm",
            "max_attempts",
            "timeout",
            "idle_timeout",
            "give_up_after",
            "max_cost",
            "fresh",
            "quiet",
        )
    }
    return build(args.job, **flags)


def _n(value: int | None) -> str:
    return "an unknown number of" if value is None else f"{value:,}"


def _print_summary(summary: Summary, *, quiet: bool) -> None:
    doc = summary.usage
    cost = doc["cost"]
    tokens = doc["tokens"]
    wall = doc["runs"][-1]["wall_seconds"] if doc["runs"] else 0.0
    unreported = cost["requests_not_reported"]
    cost_text = money(cost["total"], unknown="cost not reported") + (
        f" ({unreported:,} results without a cost)" if unreported and cost["total"] is not None else ""
    )
    if quiet:
        print(
            f"pipeline: exit {summary.exit_code} | {summary.succeeded:,} succeeded, {summary.failed:,} failed, "
            f"{summary.invalid_input:,} invalid, {summary.skipped:,} already done, {_n(summary.pending)} pending | "
            f"{tokens['total_tokens']:,} tokens | {cost_text} | {duration(wall)} | {summary.output} | "
            f"{summary.message}",
            flush=True,
        )
        return
    print(
        f"\nThis run: {summary.succeeded:,} succeeded, {summary.failed:,} failed, "
        f"{summary.invalid_input:,} invalid input lines, {summary.skipped:,} already done, "
        f"{_n(summary.pending)} pending, in {duration(wall)}."
    )
    req = doc["requests"]
    print(
        f"The folder now holds {req['succeeded']:,} results and {req['failed']:,} failures; "
        f"{tokens['total_tokens']:,} tokens ({tokens['prompt_tokens']:,} prompt, "
        f"{tokens['completion_tokens']:,} completion), {cost_text}."
    )
    print(f"Outputs: {summary.output}/ (results.jsonl, errors.jsonl, usage.json, report.md)")
    print(summary.message, flush=True)


def _mock(args: argparse.Namespace) -> int:
    from pipeline.mock.server import MockConfig, serve

    config = MockConfig(
        latency=args.latency_ms / 1000,
        jitter=args.jitter_ms / 1000,
        latency_max=args.latency_max_ms / 1000 if args.latency_max_ms else None,
        refusal_latency=args.refusal_latency_ms / 1000,
        stall_rate=args.stall_rate,
        limit_style=args.limit_style,
        quota=args.quota,
        fail_rate=args.fail_rate,
        rate_429=args.rate_429,
        retry_after=args.retry_after,
        drop_rate=args.drop_rate,
        malformed_rate=args.malformed_rate,
        error_200_rate=args.error_rate,
        cut_stream_rate=args.cut_rate,
        rpm=args.rpm,
        tpm=args.tpm,
        ratelimit_headers=args.ratelimit_headers,
        cost=not args.no_cost,
        seed=args.seed,
    )
    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        options["use_uvloop"] = True
    except ImportError:
        pass
    try:
        anyio.run(
            lambda: serve(config, host=args.host, port=args.port, port_file=args.port_file, quiet=args.quiet),
            backend_options=options,
        )
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"pipeline mock: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _tune_gc() -> None:
    """The command owns its process, so it may tune the cycle collector for a long batch:
    everything imported so far is kept out of its scans, and it runs ten times less often.
    Failed requests leave cycles (exceptions and their frames); measured on 50,000 requests
    with 5 % of them failing once, this took the run from 14.1 s to 12.3 s."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _tune_gc()
    if args.command == "mock":
        return _mock(args)
    try:
        settings = settings_from_args(args)
        if args.command == "estimate":
            from pipeline.estimate import estimate, print_estimate

            result = estimate(settings)
            print_estimate(result)
            return 1 if result.invalid else 0
        summary = run_sync(settings)
    except SettingsError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunStopped as e:
        print(f"pipeline: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("pipeline: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug: say so, and do not pass for "some requests failed" (1)
        traceback.print_exc()
        print(
            "pipeline: internal error (the traceback above is a bug worth reporting); what was "
            "written is safe, and running the same command again resumes",
            file=sys.stderr,
        )
        return EXIT_BUG
    _print_summary(summary, quiet=settings.quiet)
    return summary.exit_code
