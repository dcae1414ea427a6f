"""The command line's parser: what `pipeline run | estimate | merge | report | ray | cancel | mock` take,
and the flags a run's settings are built from (`pipeline.cli` does what each command says)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from pipeline import __version__
from pipeline.arguments import positive_float, positive_int
from pipeline.run.summary import EXIT_USAGE
from pipeline.settings import CHOICES, DEFAULT_KEY_ENV, SETTING_NAMES, TIERS, Settings, build
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


def _job_arguments(
    p: argparse.ArgumentParser, *, shard: bool = True, tier: bool = True, redo: bool = True
) -> None:
    p.add_argument("job", nargs="?", type=Path, help="a job file (TOML); flags override its keys")
    p.add_argument(
        "--input",
        help="the input file: .jsonl or .jsonl.gz (or a pipe, such as /dev/stdin: read as it comes)",
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
    if tier:
        _tier_arguments(p)


EXIT_STATUSES = """exit status:
  0    every request succeeded (or there was nothing to do: an empty input, all done before)
  1    some requests ended failed: see OUT/errors.jsonl; running again tries them again
  2    the command, the job file or the input is wrong; nothing was sent
  3    stopped early for a person to act (key refused, credits or budget spent, the endpoint
       refusing or failing everything, a wrong --base-url path, the folder unwritable): fix
       that, then run the same command again to resume
  70   a bug in pipeline: what was written is safe, and running again resumes
  130  interrupted (Ctrl-C): run the same command again to resume"""


class Parser(argparse.ArgumentParser):
    """Errors in one line with the next step, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")

    def unknown(self, extras: list[str]) -> NoReturn:
        """Name each flag that is not one, with the one most like it."""
        known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        flag = next((x for x in extras if x.startswith("-")), None)
        if flag is None:
            self.error(f"unexpected argument {extras[0]!r}")
        import difflib  # (only a mistyped flag needs it)

        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        self.error(f"unknown flag {name}{hint}")


COMMANDS = ("run", "estimate", "merge", "report", "ray", "cancel", "mock")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; given the command about to run, that command alone (its usage, help
    and errors are the same). Six commands' 80 flags took 14 million instructions to build,
    callgrind, and a run needs its own 20."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    top = Parser(
        prog="pipeline",
        description="Batches of chat completions, run to the end.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"pipeline {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if wanted("run"):
        run = sub.add_parser(
            "run",
            help="run a job",
            description="Run every line of the input; resume where a run stopped.",
            epilog=EXIT_STATUSES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _job_arguments(run)
        run.add_argument(
            "--fresh", action="store_true", default=None, help="start over: move the folder's old files aside"
        )
        run.add_argument(
            "--quiet",
            action="store_true",
            default=None,
            help="no bar: a log line a minute and a summary (cron)",
        )

    if wanted("estimate"):
        est = sub.add_parser(
            "estimate",
            help="count requests, tokens and cost, sending nothing",
            description="Read and check every line as run would; count tokens and cost; send nothing.",
            epilog="exit status: 0 every line is valid; 1 some lines are not (each is named); 2 the "
            "command or the job file is wrong",
        )
        _job_arguments(est)

    if wanted("merge"):
        merge = sub.add_parser(
            "merge",
            help="join the shards' folders OUT/shard-K-of-N/ into OUT/",
            description="Join OUT/shard-K-of-N/ into OUT/results.jsonl, errors.jsonl, usage.json, "
            "report.md and report.html, as one process would have written them. Safe to run again.",
            epilog="exit status: 0 merged; 2 nothing to merge, or shards missing, unfinished, running or "
            "of another job (each named); 3 OUT could not be written (a full disk): merge again once it can",
        )
        merge.add_argument("out", type=Path, help="the --output the shards ran with")
        merge.add_argument(
            "--partial",
            action="store_true",
            help="merge the shards there are, finished or not, and say what is not",
        )
    if wanted("report"):
        report = sub.add_parser(
            "report",
            help="write OUT's usage.json, report.md and report.html again, sending nothing",
            description="Rebuild the reports of an output folder from what it holds: a finished run, "
            "an interrupted or killed one, or a merged set of shards.",
            epilog="exit status: 0 written; 2 not an output folder; 3 the folder could not be written",
        )
        report.add_argument("out", type=Path, help="the --output a run wrote to")
    if wanted("ray"):
        cluster = sub.add_parser(
            "ray",
            help="run a job as shards on a Ray cluster, one limit for all, merged at the end",
            description="Run every line of the input as --shards N Ray tasks (OUT/shard-K-of-N/), one "
            "pace shared by all (a Ray actor, or --shared-limit), then merge them into OUT/. Run the "
            "same command again to resume. The API key is read on each node, never sent through Ray.",
            epilog=EXIT_STATUSES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _job_arguments(cluster, shard=False, tier=False, redo=False)
        cluster.add_argument("--shards", type=positive_int, required=True, help="how many shards (Ray tasks)")
        cluster.add_argument(
            "--address", help="the cluster (default RAY_ADDRESS; with neither, a local one is started)"
        )
        cluster.add_argument(
            "--max-retries",
            type=int,
            default=3,
            help="times Ray runs a shard again whose worker or node died; it resumes (default 3)",
        )
        cluster.add_argument(
            "--cpus-per-shard",
            type=positive_float,
            default=0.25,
            help="CPUs Ray sets aside for each shard (default 0.25: a shard mostly waits on the network)",
        )
        cluster.add_argument(
            "--fresh", action="store_true", default=None, help="start over: move the old files aside"
        )
        cluster.add_argument(
            "--quiet", action="store_true", default=None, help="no bar: a log line a minute and a summary"
        )
    if wanted("cancel"):
        cancel = sub.add_parser(
            "cancel",
            help="cancel the batches a --tier batch run left running in OUT",
            description="Cancel the provider's batches still running for OUT (a --tier batch run that "
            "stops leaves them running: they are paid for as they go). What they finished is kept. While "
            "a run still uses OUT, its batches are cancelled and that run takes in what they did, then stops.",
            epilog="exit status: 0 done (or nothing was running); 2 OUT is not an output folder, or the "
            "job file is wrong; 3 the endpoint refused or could not be reached, or a batch was still "
            "cancelling when it stopped waiting: run it again",
        )
        cancel.add_argument("out", type=Path, help="the --output the run wrote to")
        cancel.add_argument(
            "job", nargs="?", type=Path, help="the run's job file, for its base_url and api_key_env"
        )
        # (their defaults are the folder's: what its batch run used, which its book keeps)
        cancel.add_argument(
            "--base-url",
            help=f"the endpoint (default: the one OUT's batch run used, else {DEFAULT_BASE_URL})",
        )
        cancel.add_argument(
            "--api-key-env",
            help="the environment variable holding the key (default: the one OUT's batch run used, "
            f"else {DEFAULT_KEY_ENV})",
        )
    if wanted("mock"):
        mock = sub.add_parser(
            "mock",
            help="serve the built-in OpenAI-compatible endpoint",
            description="Serve POST /v1/chat/completions with made-up answers, for trying pipeline "
            "without a key; each flag below plays a fault or a limit a real server has.",
        )
        from pipeline.mock.command import add_mock_flags

        add_mock_flags(mock)
    return top


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a command took, by the settings' names (build takes None as not given)."""
    return {name: getattr(args, name) for name in SETTING_NAMES if hasattr(args, name)}


def settings_from_args(args: argparse.Namespace) -> Settings:
    return build(args.job, **flags_from_args(args))
