"""usage.json for machines and report.md for people, from the usage totals of every run.

Cost is never a silent $0: a figure is the sum of what the server reported (`usage.cost`),
plus what the job's price table gives for results the server did not cost; results with
neither are counted and said to be "not reported".
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson

from pipeline.account.cost import money
from pipeline.account.usage import ModelUsage, Usage
from pipeline.output.folder import atomic_write
from pipeline.output.writer import Redactor
from pipeline.report.batches import batch_sentences
from pipeline.report.cached import cache_section
from pipeline.report.html import html_report
from pipeline.report.redos import redo_figures, redo_sentences

TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _cost(m: ModelUsage) -> dict[str, Any]:
    return {
        "total": round(m.cost, 10) if m.with_cost or m.priced else None,
        "reported_by_server": round(m.cost_reported, 10),
        "from_price_table": round(m.cost_priced, 10),
        "requests_reported": m.with_cost,
        "requests_priced": m.priced,
        "requests_not_reported": m.without_cost,
        "source": _source(m),
    }


def _prompt_cache(m: ModelUsage) -> dict[str, Any]:
    """What the provider's prompt cache did for a model's answers (see `cache_section`)."""
    return {
        "cached_tokens": m.cached_tokens,
        "cache_write_tokens": m.cache_write_tokens,
        "share_cached": round(m.cached_tokens / m.prompt_tokens, 4) if m.prompt_tokens else None,
        "saved": round(m.cache_saved, 10),
        "write_extra": round(m.cache_write_extra, 10),
        "answers_not_priced": m.cache_unpriced,  # read, and the saving is not known
        "writes_not_priced": m.cache_write_unpriced,  # wrote, and the extra is not known
    }


def _source(m: ModelUsage) -> str:
    parts = []
    if m.with_cost:
        parts.append("server")
    if m.priced:
        parts.append("price table")
    if m.without_cost:
        parts.append("not reported")
    return " + ".join(parts) or "none"


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def usage_document(
    usage: Usage,
    *,
    state: dict[str, int | None],
    folder: Path,
    batches: dict[str, Any] | None = None,
    held: int = 0,
    running: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything usage.json holds; `state` counts the folder's lines now (results, errors);
    `batches`: what the folder's batches came to (`pipeline.batch.tally.figures`); `held`: the
    ids a redo chose that keep their earlier answer (no new one yet), which the run that chose
    them took out of the successes: still results, each once. `running`: the record of a run
    still going, as far as it has come (the live report's), listed after the runs ended."""
    total = usage.totals()
    runs = usage.runs if running is None else [*usage.runs, running]
    wall = sum(float(r.get("wall_seconds", 0.0)) for r in runs)
    outcomes = dict(usage.outcomes)
    if held:
        outcomes["succeeded"] = outcomes.get("succeeded", 0) + held
    succeeded_events = outcomes.get("succeeded", 0)
    return {
        "folder": str(folder),
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "requests": state,
        "tokens": {k: getattr(total, k) for k in (*TOKEN_KEYS, "cache_write_tokens")},
        "cost": _cost(total),
        "prompt_cache": _prompt_cache(total),
        "models": {
            name: {
                "requests": m.requests,
                "choices": m.choices,
                **{k: getattr(m, k) for k in (*TOKEN_KEYS, "cache_write_tokens")},
                "cost": _cost(m),
                "prompt_cache": _prompt_cache(m),
            }
            for name, m in sorted(usage.models.items())
        },
        "requested_models": dict(sorted(usage.requested_models.items())),
        "outcomes": outcomes,
        "answers_by_status": dict(sorted(usage.answers.items())),
        "errors_by_code": dict(sorted(usage.errors.items())),
        "verdicts": dict(sorted(usage.verdicts.items())),
        "attempts": usage.attempts,
        "retries": usage.retries,
        "discarded": usage.discarded,
        # Results taken from the answer cache (or from a request of the same key in flight):
        # not sent, not paid, so in none of the figures above; what they would have cost.
        "reused": {
            "requests": usage.reused,
            "cost_not_spent": round(usage.reused_cost, 6),
            "requests_not_priced": usage.reused_unpriced,
        },
        "images": {
            "count": usage.images,
            "bytes_read": usage.image_bytes_read,
            "bytes_sent": usage.image_bytes_sent,
        },
        "latency_seconds": {f"p{q}": _seconds(usage.latency.percentile(q)) for q in (50, 90, 99)},
        "ttft_seconds": {f"p{q}": _seconds(usage.ttft.percentile(q)) for q in (50, 90, 99)},
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(succeeded_events / wall, 3) if wall else None,
        "tokens_per_second": round(total.total_tokens / wall, 1) if wall else None,
        "runs": runs,
        "timeline": usage.timeline.state(),
        "slowest": [list(s) for s in usage.slowest],
        "error_messages": {
            code: dict(counts.most_common(5)) for code, counts in sorted(usage.messages.items())
        },
        **({"batches": batches} if batches is not None else {}),
        **({"redo": redo} if (redo := redo_figures(usage.redos)) is not None else {}),
    }


def _cell(value: Any) -> str:
    """Text for a table's cell, whatever it holds: a model's name, an error code, a verdict or
    a run's note come from the server and the job, and a `|` in one (or a line break) split its
    row into more cells than the table has, shifting every figure after it."""
    return " ".join(str(value).replace("\\", "\\\\").replace("|", "\\|").split())


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ("–" if value is None else str(value))


def markdown(doc: dict[str, Any]) -> str:
    req = doc["requests"]
    cost = doc["cost"]
    out = [
        "# Usage report",
        "",
        f"Folder `{doc['folder']}`, updated {doc['updated']}, covering {len(doc['runs'])} run(s).",
        "",
        "## Requests",
        "",
        "| state | lines |",
        "|---|---:|",
        *(f"| {_cell(k.replace('_', ' '))} | {_n(v)} |" for k, v in req.items()),
        "",
        "## Tokens and cost",
        "",
        "| model | requests | prompt | completion | total | cached | reasoning | cost | cost source |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in doc["models"].items():
        c = m["cost"]
        source = c["source"]
        if c["requests_not_reported"]:
            source += f" ({c['requests_not_reported']:,} not reported)"
        out.append(
            f"| {_cell(name)} | {m['requests']:,} | "
            + " | ".join(f"{m[k]:,}" for k in TOKEN_KEYS)
            + f" | {money(c['total'])} | {_cell(source)} |"
        )
    t = doc["tokens"]
    out.append(
        "| **all** | "
        + f"{sum(m['requests'] for m in doc['models'].values()):,} | "
        + " | ".join(f"{t[k]:,}" for k in TOKEN_KEYS)
        + f" | {money(cost['total'])} | {cost['source']} |"
    )
    if cost["requests_not_reported"]:
        out += [
            "",
            f"{cost['requests_not_reported']:,} result(s) came without a cost from the server and no "
            "price in the job's [prices] table: their cost is not reported, not zero.",
        ]
    out += cache_section(doc)
    if doc.get("batches"):
        out += ["", "## Batches", "", *(f"{s}  " for s in batch_sentences(doc["batches"]))]
        out[-1] = out[-1].rstrip()
    if doc.get("redo"):
        out += ["", "## Redone", "", *(f"{_cell(s)}  " for s in redo_sentences(doc["redo"]))]
        out[-1] = out[-1].rstrip()
    out += ["", "## Answers", "", "| answer | count |", "|---|---:|"]
    out += [f"| {_cell(k)} | {v:,} |" for k, v in doc["answers_by_status"].items()]
    out += ["", f"Attempts {doc['attempts']:,}, of which retries {doc['retries']:,}."]
    if doc["discarded"]:
        out += [
            "",
            f"{doc['discarded']:,} answer(s) were thrown away (they broke the verdict schema, or came "
            "empty or broken): they were paid for, so their tokens and cost are in the totals above.",
        ]
    reused = doc.get("reused") or {}
    if reused.get("requests"):
        unpriced = reused["requests_not_priced"]
        out += [
            "",
            f"{reused['requests']:,} result(s) were reused from the answer cache, not sent: "
            f"{money(reused['cost_not_spent'])} not spent"
            + (f" ({unpriced:,} of them of unknown cost)" if unpriced else "")
            + ". They are in no figure above, which counts what was paid.",
        ]
    images = doc["images"]
    if images["count"]:
        read, sent = images["bytes_read"], images["bytes_sent"]
        saved = f", {read / sent:.1f}x less" if sent and read > sent else ""
        out += [
            "",
            f"{images['count']:,} local image(s): {read / 1e6:,.1f} MB read, {sent / 1e6:,.1f} MB sent "
            f"(before base64){saved}.",
        ]
    if doc["errors_by_code"]:
        out += ["", "## Failures by code", "", "| code | count |", "|---|---:|"]
        out += [f"| {_cell(k)} | {v:,} |" for k, v in doc["errors_by_code"].items()]
    if doc["verdicts"]:
        out += ["", "## Verdicts", "", "| verdict | count |", "|---|---:|"]
        out += [f"| {_cell(k)} | {v:,} |" for k, v in doc["verdicts"].items()]
    if len(doc["requested_models"]) > 0:
        out += [
            "",
            "## Models asked for and models that answered",
            "",
            "| asked -> answered | requests |",
            "|---|---:|",
        ]
        out += [f"| {_cell(k)} | {v:,} |" for k, v in doc["requested_models"].items()]
    lat, ttft = doc["latency_seconds"], doc["ttft_seconds"]
    out += [
        "",
        "## Speed",
        "",
        "| | p50 | p90 | p99 |",
        "|---|---:|---:|---:|",
        "| latency (s) | " + " | ".join(_n(lat[k]) for k in ("p50", "p90", "p99")) + " |",
    ]
    if ttft["p50"] is not None:
        out.append(
            "| time to first token (s) | " + " | ".join(_n(ttft[k]) for k in ("p50", "p90", "p99")) + " |"
        )
    out += [
        "",
        f"Wall time {doc['wall_seconds']:,} s over all runs; "
        f"{_n(doc['requests_per_second'])} requests/s and {_n(doc['tokens_per_second'])} tokens/s.",
        "",
        "## Runs",
        "",
        "| started | wall (s) | succeeded | failed | invalid input | attempts | exit | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["runs"]:
        out.append(
            f"| {_cell(r.get('started', ''))} | {r.get('wall_seconds', 0):,} | {r.get('succeeded', 0):,} | "
            f"{r.get('failed', 0):,} | {r.get('invalid_input', 0):,} | {r.get('attempts', 0):,} | "
            f"{_cell(r.get('exit', ''))} | {_cell(r.get('note', ''))} |"
        )
    return "\n".join(out) + "\n"


def write_reports(folder: Path, doc: dict[str, Any], redact: Redactor) -> None:
    atomic_write(folder / "usage.json", redact(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"))
    atomic_write(folder / "report.md", redact(markdown(doc).encode()))
    atomic_write(folder / "report.html", redact(html_report(doc).encode()))
