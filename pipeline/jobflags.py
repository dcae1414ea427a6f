"""The flags a job takes (`pipeline run`, `estimate` and `ray`): its input and output, the
endpoint, the pace, the retries and timeouts, the budget, the caches, `--redo`, `--shard` and
the batch tier's (`--tier batch` and its knobs). Their names are the settings' (`pipeline.settings`
builds a run's settings from them); `pipeline.parser` puts them on each command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.arguments import positive_float, positive_int
from pipeline.settings import CHOICES, DEFAULT_KEY_ENV, TIERS
from pipeline.urls import DEFAULT_BASE_URL


def _endpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help=f"the endpoint (default {DEFAULT_BASE_URL})")
    p.add_argument(
        "--api-key-env", help=f"the environment variable holding the key (default {DEFAULT_KEY_ENV})"
    )


def _tier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tier",
        choices=TIERS,
        help="sync (the default): each line a request, answered now; batch: the lines as the "
        "provider's batches, at its batch price (about half), answered within 24 hours",
    )
    p.add_argument(
        "--batch-api",
        choices=CHOICES["batch_api"],
        help="the batch API's shape: files (OpenAI's: a JSONL file uploaded, then a batch of it) or "
        "inline (OpenRouter's: the requests in the batch, one model each); default: what the "
        "endpoint offers",
    )
    p.add_argument(
        "--then",
        choices=CHOICES["then"],
        help="with --tier batch: send the lines a batch left undone (expired, cancelled, failed for "
        "now) as requests, at the synchronous price, rather than in a new batch",
    )
    p.add_argument(
        "--batch-poll",
        type=positive_float,
        metavar="SECONDS",
        help="with --tier batch: seconds between looks at a running batch (default 30)",
    )
    for what, most in (("lines", "requests"), ("bytes", "bytes")):
        p.add_argument(
            f"--batch-max-{what}",
            type=positive_int,
            metavar="N",
            help=f"with --tier batch: {most} a batch holds at most, where the provider allows fewer "
            "than the shape's own limit (default: the shape's: 50,000 and 200 MB, or 5,000 inline)",
        )


def job_arguments(
    p: argparse.ArgumentParser, *, shard: bool = True, tier: bool = True, redo: bool = True
) -> None:
    """A job's flags, on the command that runs or counts one; `shard`, `tier`, `redo`: with
    those flags (`pipeline ray` takes none of them)."""
    p.add_argument("job", nargs="?", type=Path, help="a job file (TOML); flags override its keys")
    p.add_argument(
        "--input",
        help="the input file: .jsonl or .jsonl.gz (or a pipe; - for standard input: read as it comes)",
    )
    p.add_argument("--output", help="the output folder; {date} becomes today's date")
    _endpoint_arguments(p)
    p.add_argument(
        "--model", help="the model for lines that name none (beats the job file's; a line's own model stays)"
    )
    p.add_argument("--concurrency", type=positive_int, help="requests in flight at most (default 64)")
    p.add_argument("--rpm", type=positive_float, help="requests per minute the endpoint allows")
    p.add_argument("--tpm", type=positive_float, help="tokens per minute the endpoint allows")
    p.add_argument(
        "--max-attempts",
        type=positive_int,
        help="attempts per request, first included; a 429 spends none (default 8)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        help="seconds an answer that is not streamed may take, whole (default 600: long reasoning "
        "answers send nothing until they are done)",
    )
    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        help="seconds a streamed answer may send nothing before it is cut and sent again (default 60)",
    )
    p.add_argument(
        "--give-up-after",
        type=positive_float,
        help="seconds of nothing but 429s, or of an endpoint failing every request, before the run "
        "stops with exit 3, to resume later (default 600); a model paced on its own that lets nothing "
        "through fails its lines unsent instead, and the others go on",
    )
    p.add_argument(
        "--max-cost", type=positive_float, help="stop dispatching before spending more dollars than this"
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="keep every answer in DIR and take a request's answer from there when the same request "
        "(model, parameters, messages, images) was answered before, by any run: not sent, not paid, "
        'marked "reused"; leave it off where a temperature should give a new answer each time',
    )
    p.add_argument(
        "--cache-max-gb",
        type=positive_float,
        help="the answer cache's size at most, in GB; the answers used longest ago go first (default: no bound)",
    )
    p.add_argument(
        "--no-reorder",
        dest="reorder",
        action="store_false",
        default=None,
        help="send the lines in input order; by default the lines that share a long prefix (1,024 tokens "
        "or more: a system prompt, an image) are sent close together, its first line alone, so that the "
        "provider's prompt cache holds it for the rest (job file: reorder = false)",
    )
    p.add_argument(
        "--prompt-cache",
        action="store_true",
        default=None,
        help="mark requests that share a long prefix (1,024 tokens or more) for the provider's prompt "
        "cache: cache_control on it for Anthropic's models, prompt_cache_key for the others",
    )
    if redo:
        p.add_argument(
            "--redo",
            metavar="WHAT",
            help="send again the lines of OUT that need it, the request defaults free to change for them: "
            "a comma list of length (answers cut by max_tokens), filter (content_filter), invalid (failing "
            "the verdict now), failed (errors.jsonl), ids:FILE (one custom_id a line); the older answers "
            "move to OUT/superseded.jsonl",
        )
    if shard:
        p.add_argument(
            "--shard",
            metavar="K/N",
            help="run shard K of N (K from 1): the lines whose id hashes to K, into OUT/shard-K-of-N/; "
            "join them with pipeline merge OUT",
        )
    p.add_argument(
        "--shared-limit",
        metavar="redis://HOST:PORT/DB",
        help="share one pace with every process of the same account through this Redis; "
        "--rpm and --tpm are then the account's limits",
    )
    p.add_argument(
        "--metrics-port",
        type=positive_int,
        metavar="PORT",
        help="serve Prometheus metrics at :PORT/metrics while the run goes (needs the metrics extra); "
        "every process on one machine needs a port of its own (pipeline ray gives shard K PORT+K-1)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="ADDRESS",
        help="the address the metrics are served on (default: every interface, as a cluster scrapes "
        "a pod's own IP; 127.0.0.1: this machine only)",
    )
    if tier:
        _tier_arguments(p)
