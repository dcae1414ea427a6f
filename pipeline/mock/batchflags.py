"""`pipeline mock`'s flags for the batch APIs (`pipeline.mock.batches`), one for each of
`MockConfig`'s batch fields."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.arguments import positive_int
from pipeline.mock.command import fraction
from pipeline.mock.names import BATCH_APIS

TIMES = (
    ("validating", "a batch is validating"),
    ("seconds", "a batch is in progress, its lines done evenly across them"),
    ("finalizing", "a batch is finalizing once its lines are done"),
    ("cancelling", "a batch is cancelling once asked to cancel"),
)


def add_batch_flags(mock: argparse.ArgumentParser) -> None:
    mock.add_argument(
        "--batch-api",
        choices=BATCH_APIS,
        default="files",
        help="the batch API served: files: OpenAI's (upload a JSONL file, make a batch of it; the "
        "default); inline: OpenRouter's (a requests array posted, results read from the batch); "
        "none: no batch API, every files and batches path 404",
    )
    for name, what in TIMES:
        mock.add_argument(
            f"--batch-{name}",
            type=_seconds,
            default=0.0,
            metavar="SECONDS",
            help=f"seconds {what} (default 0)",
        )
    mock.add_argument(
        "--batch-expire-after",
        type=_seconds,
        metavar="SECONDS",
        help="a batch expires this many seconds after it was made, with the lines done so far answered "
        "and the rest in its error file as batch_expired",
    )
    mock.add_argument(
        "--batch-fail-rate",
        type=fraction,
        default=0.0,
        help="fraction of a batch's lines answered 500 in its error file, at random (a line whose "
        "content holds 'fail_me' always fails, with a 400; one that holds 'invalid_me' fails its "
        "batch's validation, named by line)",
    )
    mock.add_argument(
        "--batch-max-lines",
        type=positive_int,
        metavar="N",
        help="requests a batch may hold, more fails its validation (default 50,000; inline 5,000)",
    )
    mock.add_argument(
        "--batch-max-bytes", type=positive_int, metavar="N", help="bytes a batch may hold (default 200 MB)"
    )
    mock.add_argument(
        "--batch-metadata",
        action=argparse.BooleanOptionalAction,
        help="batches keep the metadata they are sent (default: files yes, inline no, as OpenRouter)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds are 0 or more")
    return value


def batch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' values, as `MockConfig`'s batch fields."""
    names = [
        "api",
        *(name for name, _ in TIMES),
        "expire_after",
        "fail_rate",
        "max_lines",
        "max_bytes",
        "metadata",
    ]
    return {f"batch_{name}": getattr(args, f"batch_{name}") for name in names}
