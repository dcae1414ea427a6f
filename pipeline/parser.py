"""The command line's parser: what `pipeline run | estimate | merge | report | ray | cancel | mock` take,
and the flags a run's settings are built from (`pipeline.jobflags` holds a job's own; `pipeline.cli`
does what each command says)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from pipeline import __version__
from pipeline.arguments import positive_float, positive_int
from pipeline.jobflags import job_arguments
from pipeline.run.summary import EXIT_USAGE
from pipeline.settings import DEFAULT_KEY_ENV, SETTING_NAMES, Settings, build
from pipeline.urls import DEFAULT_BASE_URL

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
        job_arguments(run)
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
        job_arguments(est)

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
        job_arguments(cluster, shard=False, tier=False, redo=False)
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
