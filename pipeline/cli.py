"""`pipeline run | estimate | merge | report | ray | cancel | mock`: a thin layer over
`pipeline.run`, the folder's tools and the mock.

Exit status (DESIGN.md): 0 every request succeeded; 1 some ended failed; 2 the command or
job file is wrong and nothing was sent; 3 the run stopped early for a person to act, and can be
resumed; 130 interrupted, and can be resumed; 70 a bug in pipeline (resumable too).
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import sys
import traceback
from pathlib import Path

from pipeline.account.cost import money
from pipeline.errors import RunStopped, SettingsError
from pipeline.jobfile import read_job_file
from pipeline.output.device import unwritable
from pipeline.parser import COMMANDS, Parser, flags_from_args, parser, settings_from_args
from pipeline.run.progress import duration
from pipeline.run.runner import run_sync
from pipeline.run.summary import EXIT_BUG, EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USAGE, Summary
from pipeline.settings import check_key_env
from pipeline.urls import check_base_url


def _n(value: int | None) -> str:
    return "an unknown number of" if value is None else f"{value:,}"


def _print_summary(summary: Summary, *, quiet: bool, model_flag: bool = False) -> None:
    doc = summary.usage
    cost = doc["cost"]
    tokens = doc["tokens"]
    wall = doc["runs"][-1]["wall_seconds"] if doc["runs"] else 0.0
    unreported = cost["requests_not_reported"]
    cost_text = money(cost["total"], unknown="cost not reported") + (
        f" ({unreported:,} results without a cost)" if unreported and cost["total"] is not None else ""
    )
    batches = doc.get("batches") if doc["runs"] and doc["runs"][-1].get("tier") == "batch" else None
    reused = f" ({summary.reused:,} reused)" if summary.reused else ""
    kept = doc.get("reused") or {}
    if kept.get("requests"):
        if not doc["models"]:  # every result reused: nothing paid, which is known
            cost_text = money(0.0)
        cost_text += f", {money(kept['cost_not_spent'])} not spent (answers reused)"
    if quiet:
        brief = ""
        if batches:
            from pipeline.report.batches import batch_brief

            brief = f" | {batch_brief(batches)}"
        print(
            f"pipeline: exit {summary.exit_code} | {summary.succeeded:,} succeeded{reused}, {summary.failed:,} failed, "
            f"{summary.invalid_input:,} invalid, {summary.skipped:,} already done, {_n(summary.pending)} pending | "
            f"{tokens['total_tokens']:,} tokens | {cost_text}{brief} | {duration(wall)} | {summary.output} | "
            f"{summary.message}",
            flush=True,
        )
        return
    print(
        f"\nThis run: {summary.succeeded:,} succeeded{reused}, {summary.failed:,} failed, "
        f"{summary.invalid_input:,} invalid input lines, {summary.skipped:,} already done, "
        f"{_n(summary.pending)} pending, in {duration(wall)}."
    )
    req = doc["requests"]
    print(
        f"The folder now holds {req['succeeded']:,} results and {req['failed']:,} failures; "
        f"{tokens['total_tokens']:,} tokens ({tokens['prompt_tokens']:,} prompt, "
        f"{tokens['completion_tokens']:,} completion), {cost_text}."
    )
    if batches:
        from pipeline.report.batches import batch_sentences

        print(" ".join(batch_sentences(batches)))
    print(f"Outputs: {summary.output}/ (results.jsonl, errors.jsonl, usage.json, report.md, report.html)")
    if model_flag and summary.own_model:
        print(
            f"{summary.own_model:,} line(s) named a model of their own and kept it; --model sets "
            "the model of the lines that name none"
        )
    print(summary.message, flush=True)


def _merge(out: Path, *, partial: bool) -> int:
    from pipeline.output.merge import merge_or_stop

    try:
        merged = merge_or_stop(out, partial=partial)
    except SettingsError as e:
        print(f"pipeline merge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunStopped as e:  # OUT or a shard cannot be written: each file is whole, old or new
        print(f"pipeline merge: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(
            "pipeline merge: interrupted; merge again: each file is replaced whole or not at all",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(merged)
    for problem in merged.missing:
        print(f"pipeline merge: partial: {problem}", file=sys.stderr)
    return 0


def _report(out: Path) -> int:
    from pipeline.report.rebuild import rebuild

    try:
        doc = rebuild(out)
    except SettingsError as e:
        print(f"pipeline report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as e:
        print(f"pipeline report: stopped: {unwritable(out, e, again='to redraw them')}", file=sys.stderr)
        return EXIT_STOPPED
    except RunStopped as e:
        print(f"pipeline report: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    print(
        f"Wrote {out}/report.html, report.md and usage.json: {len(doc['runs'])} run(s), "
        f"{doc['requests']['succeeded']:,} results, {doc['requests']['failed']:,} failures"
    )
    return 0


def _cancel(args: argparse.Namespace) -> int:
    """`pipeline cancel OUT [JOB]`: the endpoint and the key's variable from the flags, else the
    job file; given by neither, None, and `cancel_folder` takes what the folder's batch run used."""
    try:
        job = read_job_file(args.job) if args.job is not None else {}
        base_url = args.base_url or job.get("base_url")
        key_env = args.api_key_env or job.get("api_key_env")
        if base_url is not None:
            base_url = check_base_url(base_url)
        if key_env is not None:
            key_env = check_key_env(key_env)
        from pipeline.batch.cancel import cancel_folder

        status: int = cancel_folder(args.out, base_url, key_env)
        return status
    except SettingsError as e:
        print(f"pipeline cancel: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunStopped as e:
        print(f"pipeline cancel: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("pipeline cancel: interrupted; run it again to cancel what is still running", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug: said as one, not passed for "some requests failed" (1)
        traceback.print_exc()
        print(
            "pipeline cancel: internal error (the traceback above is a bug worth reporting); "
            "run it again to cancel what is still running",
            file=sys.stderr,
        )
        return EXIT_BUG


def _tune_gc() -> None:
    """The command owns its process, so it may tune the cycle collector for a long batch:
    everything imported so far is kept out of its scans, and it runs ten times less often.
    Failed requests leave cycles (exceptions and their frames); measured on 50,000 requests
    with 5 % of them failing once, this took the run from 14.1 s to 12.3 s."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    given = sys.argv[1:] if argv is None else argv
    # The command comes first (the top level's own flags only print and exit): its flags
    # alone are built. Anything else gets the whole parser, and its error or help.
    top = parser(given[0] if given and given[0] in COMMANDS else None)
    args, extras = top.parse_known_args(argv)
    if extras:
        commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices[args.command]
        assert isinstance(command, Parser)
        command.unknown(extras)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _tune_gc()
    if args.command == "mock":
        from pipeline.mock.command import run_mock

        return run_mock(args)
    if args.command == "merge":
        return _merge(args.out, partial=args.partial)
    if args.command == "report":
        return _report(args.out)
    if args.command == "cancel":
        return _cancel(args)
    try:
        settings = settings_from_args(args)
        for warning in settings.warnings:
            print(f"pipeline: warning: {warning}", file=sys.stderr)
        if args.command == "ray":
            if settings.tier != "sync":
                # Its shards build their settings from the job file: each would submit batches
                # into its own folder, which `pipeline cancel OUT` does not reach.
                raise SettingsError(
                    f'{settings.job_file}: tier = "{settings.tier}" is for pipeline run (the provider '
                    "does a batch's work: it needs no cluster); pipeline ray sends requests: set "
                    'tier = "sync" to run this job on the cluster'
                )
            from pipeline.cluster.driver import ray_command

            return ray_command(settings, flags_from_args(args), args.job, args)
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
    _print_summary(summary, quiet=settings.quiet, model_flag=args.model is not None)
    return summary.exit_code
