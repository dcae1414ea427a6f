"""`pipeline mock`: the built-in endpoint on the command line, for demos, tests and the
benchmark. Every fault it can play is a flag, off by default."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import anyio

from pipeline.arguments import positive_float, positive_int
from pipeline.mock.names import COUNTS, STYLES, WAYS, Change

if TYPE_CHECKING:
    from pipeline.mock.config import MockConfig

EXIT_USAGE = 2


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1")
    return value


def _model_limit(text: str) -> tuple[str, float]:
    """MODEL=N (a model's name may hold ':' and '/', as "vendor/model:free" does)."""
    model, sep, number = text.rpartition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=N")
    return model, positive_float(number)


def _changes(text: str) -> list[Change]:
    """[MODEL:]T=RPM[,T=RPM...]: the account's (or MODEL's) rpm set to RPM at T seconds."""
    head, _, times = text.rpartition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
    out: list[Change] = []
    for part in times.split(","):
        at, sep, rpm = part.partition("=")
        try:
            out.append((head, float(at), positive_float(rpm)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not T=RPM") from None
        if not sep or out[-1][1] < 0:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not T=RPM (T seconds, 0 or more)")
    return out


def add_mock_flags(mock: argparse.ArgumentParser) -> None:
    mock.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    mock.add_argument(
        "--port", type=int, default=8080, help="the port to listen on (default 8080); 0 picks a free one"
    )
    mock.add_argument("--port-file", help="write the port to this file once listening (with --port 0)")
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
    mock.add_argument(
        "--fail-rate", type=fraction, default=0.0, help="fraction answered 500, at random (0 to 1)"
    )
    mock.add_argument("--rate-429", type=fraction, default=0.0, help="fraction answered 429 at random")
    mock.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        help="seconds of the Retry-After sent with each random 429 (default 1)",
    )
    mock.add_argument("--drop-rate", type=fraction, default=0.0, help="fraction of connections dropped")
    mock.add_argument("--malformed-rate", type=fraction, default=0.0, help="fraction of malformed 200 bodies")
    mock.add_argument("--error-rate", type=fraction, default=0.0, help="fraction of errors inside a 200")
    mock.add_argument("--cut-rate", type=fraction, default=0.0, help="fraction of streams cut short")
    mock.add_argument(
        "--stall-rate",
        type=fraction,
        default=0.0,
        help="fraction of jobs whose first stream stops after one chunk and stays open",
    )
    mock.add_argument("--rpm", type=float, help="enforce requests per minute (see --limit-style)")
    mock.add_argument("--tpm", type=float, help="enforce tokens per minute (per window)")
    mock.add_argument(
        "--tpm-count",
        choices=COUNTS,
        default="usage",
        help="how --tpm counts a request: usage: the tokens its answer uses (default); arrival: "
        "its prompt and max_tokens (times n), charged when it arrives, as OpenAI documents",
    )
    mock.add_argument(
        "--limit-style",
        choices=STYLES,
        default="second",
        help="second: rpm/60 per wall-clock second; minute: rpm per wall-clock minute; bucket: "
        "refilled continuously, holding --bucket-capacity seconds of the rate",
    )
    mock.add_argument(
        "--bucket-capacity",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="seconds of its rate a bucket holds (default 60: a minute's quota at once; 1: one second's)",
    )
    mock.add_argument(
        "--model-rpm",
        type=_model_limit,
        action="append",
        default=[],
        metavar="MODEL=N",
        help="requests per minute for the requests naming MODEL, counted as --limit-style says, "
        "besides --rpm (which counts every request); again for more models",
    )
    mock.add_argument(
        "--model-tpm",
        type=_model_limit,
        action="append",
        default=[],
        metavar="MODEL=N",
        help="tokens per minute for the requests naming MODEL, counted as --tpm-count says",
    )
    mock.add_argument(
        "--limit-changes",
        type=_changes,
        action="append",
        default=[],
        metavar="[MODEL:]T=RPM[,T=RPM...]",
        help="set --rpm (or MODEL's --model-rpm) to RPM at T seconds after the first request; "
        "again for more scopes (e.g. 40=1200,80=3000)",
    )
    mock.add_argument(
        "--wait-said",
        choices=WAYS,
        help="how a limit's 429 says its wait: exact: Retry-After in seconds with ms (the windows' "
        "default); seconds: Retry-After rounded up to whole seconds; ms: retry-after-ms, and "
        "Retry-After rounded up; message: 'Please try again in 71ms' in the message only (the "
        "bucket's default); none: not at all",
    )
    mock.add_argument("--quota", type=int, help="requests, then every one refused until midnight UTC")
    mock.add_argument(
        "--unknown-model",
        action="append",
        default=[],
        help="a model answered 404 model_not_found (again for more than one)",
    )
    mock.add_argument("--ratelimit-headers", action="store_true", help="send x-ratelimit-* headers")
    mock.add_argument("--no-cost", action="store_true", help="leave usage.cost out")
    mock.add_argument(
        "--prefix-cache",
        type=positive_int,
        metavar="N",
        help="keep a provider's prompt cache: N prefixes a model (the whole prompt, or up to the last "
        "cache_control marker; read as a request arrives, written when its answer is made), least "
        "recently used dropped first; cached tokens reported in "
        "usage.prompt_tokens_details and costed at a quarter. Off: one answer in four says half "
        "its prompt was cached",
    )
    mock.add_argument(
        "--prefix-cache-ttl",
        type=positive_float,
        default=300.0,
        metavar="SECONDS",
        help="seconds a prefix is kept after its last use (default 300)",
    )
    mock.add_argument(
        "--prefix-cache-min-tokens",
        type=positive_int,
        default=1024,
        metavar="TOKENS",
        help="the fewest tokens a prefix is cached and read from (default 1024, as OpenAI's)",
    )
    from pipeline.mock.batchflags import add_batch_flags

    add_batch_flags(mock)
    mock.add_argument("--seed", type=int, default=0, help="seed of the random faults and answers (default 0)")
    mock.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _unlimited(args: argparse.Namespace) -> str | None:
    """A limit change for a scope that has no request limit to change, if any."""
    models = dict(args.model_rpm)
    for model, _, _ in (change for changes in args.limit_changes for change in changes):
        if (model and model not in models) or (not model and not args.rpm):
            return f"--limit-changes for {model or 'the account'} needs {'--model-rpm' if model else '--rpm'}"
    return None


def mock_config(args: argparse.Namespace) -> MockConfig:
    """What `pipeline mock`'s flags ask the mock to play."""
    from pipeline.mock.batchflags import batch_options
    from pipeline.mock.config import MockConfig

    return MockConfig(
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
        tpm_count=args.tpm_count,
        bucket_capacity=args.bucket_capacity,
        model_rpm=dict(args.model_rpm),
        model_tpm=dict(args.model_tpm),
        limit_changes=tuple(change for changes in args.limit_changes for change in changes),
        wait_said=args.wait_said,
        ratelimit_headers=args.ratelimit_headers,
        unknown_models=tuple(args.unknown_model),
        cost=not args.no_cost,
        prefix_cache=args.prefix_cache or 0,
        prefix_cache_ttl=args.prefix_cache_ttl,
        prefix_cache_min_tokens=args.prefix_cache_min_tokens,
        seed=args.seed,
        **batch_options(args),
    )


def run_mock(args: argparse.Namespace) -> int:
    from pipeline.mock.hosting import serve

    wrong = _unlimited(args)
    if wrong is not None:
        print(f"pipeline mock: {wrong}", file=sys.stderr)
        return EXIT_USAGE
    config = mock_config(args)
    from pipeline.run.runner import loop_options

    try:
        anyio.run(
            lambda: serve(config, host=args.host, port=args.port, port_file=args.port_file, quiet=args.quiet),
            backend_options=loop_options(),
        )
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"pipeline mock: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0
