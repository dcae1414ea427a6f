"""report.html: the run over time, in charts, in one file that opens anywhere.

Drawn from usage.json's document alone (so `pipeline report OUT` redraws it from a folder); the
charts are drawn in `pipeline.report.charts`. Each chart is an <img> of a data: URL, which a browser
never lets run a script or fetch anything, and the page's Content-Security-Policy forbids both
besides: the page holds no script of its own. Everything from outside (model names, ids,
messages, verdicts, notes) is escaped where it is written.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from pipeline.account.cost import money
from pipeline.account.timeline import joined
from pipeline.report.batches import batch_sentences
from pipeline.report.cached import HEAD, cache_notes, cache_rows
from pipeline.report.charts import bars, local, over_time, zone
from pipeline.report.svg import escape

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;border-bottom:1px solid #eee;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#666}.status{font-weight:600}.live{color:#2266aa}
"""
NO_TOKENS = "No tokens were counted."


def _no_cost(costs: list[float | None], unknown: int = 0) -> str:
    """Nothing spent, nothing known of what was, or nothing spent that is known beside `unknown`
    requests whose cost nobody knows: not the same news."""
    if all(c is None for c in costs):
        return "No cost is known: no answer reported one and no price was given."
    if unknown or None in costs:
        some = f"{unknown:,} request(s)" if unknown else "a model's requests"
        return (
            f"No cost was counted, but {some} came without one and no price was given: what was "
            "spent is not fully known."
        )
    return "Nothing was spent."


def _e(value: Any) -> str:
    return escape(str(value))


def _num(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return "–" if value is None else _e(value)


def _table(head: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        cells = (
            f'<td class="n">{_num(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        out += ["<tr>", *cells, "</tr>"]
    return "".join([*out, "</table>"])


def html_report(doc: dict[str, Any], *, refresh: int | None = None) -> str:
    """The page; `refresh`: while the run goes (`pipeline.run.live`), the seconds after which
    the browser loads it again (a meta refresh: a navigation, which the CSP leaves alone, not
    a script); None for the page written once the run is over."""
    stretches: list[dict[str, Any]] = doc.get("timeline", [])
    length, points = joined(stretches)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        *([f'<meta http-equiv="refresh" content="{int(refresh)}">'] if refresh is not None else []),
        f"<title>Run report: {_e(doc['folder'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run report</h1><p>Folder <code>{_e(doc['folder'])}</code>, updated {_e(doc['updated'])}, "
        f"{len(doc['runs'])} run(s); {_e(money(doc['cost']['total']))} spent "
        f"({_e(doc['cost']['source'])}).</p>",
        _status(doc, refresh),
        "<h2>Requests</h2>",
        _table(["state", "lines"], [[k.replace("_", " "), v] for k, v in doc["requests"].items()]),
    ]
    if doc.get("batches"):
        parts.append("<h2>Batches</h2>")
        parts += [f"<p>{_e(said)}</p>" for said in batch_sentences(doc["batches"])]
    parts.append("<h2>Over time</h2>")
    if points:
        whose = "in this run" if len(stretches) < 2 else f"in these {len(stretches)} runs"
        parts += over_time(length, points, retries=doc.get("retries"), whose=whose)
    else:
        parts.append("<p class='note'>No interval was recorded.</p>")
    models = doc["models"]
    parts.append("<h2>Tokens and cost by model</h2>")
    if models:
        names = list(models)
        tokens = [m["total_tokens"] for m in models.values()]
        parts.append(bars(names, tokens, "Tokens by model", "tokens", unit="tokens", empty=NO_TOKENS))
        costs = [m["cost"]["total"] for m in models.values()]
        unknown = sum(m["cost"].get("requests_not_reported") or 0 for m in models.values())
        drawn = [math.nan if c is None else c for c in costs]  # (its bar says "not known")
        parts.append(bars(names, drawn, "Cost by model", "cost", unit="$", empty=_no_cost(costs, unknown)))
    parts.append(
        _table(
            ["model", "requests", "prompt", "completion", "total", "cost", "cost source"],
            [
                [
                    n,
                    m["requests"],
                    m["prompt_tokens"],
                    m["completion_tokens"],
                    m["total_tokens"],
                    money(m["cost"]["total"]),
                    m["cost"]["source"],
                ]
                for n, m in models.items()
            ],
        )
    )
    cached = cache_rows(doc)
    if cached:
        parts.append("<h3>Prompt cache</h3>")
        parts.append(_table(HEAD, cached))
        parts += [f"<p class='note'>{_e(note)}</p>" for note in cache_notes(doc)]
    runs = _by_run(doc, stretches)
    parts.append("<h2>Tokens and cost by run</h2>")
    if runs:
        labels = [r[0] for r in runs]
        parts.append(
            bars(
                labels, [r[1] + r[2] for r in runs], "Tokens by run", "tokens", unit="tokens", empty=NO_TOKENS
            )
        )
        parts.append(
            bars(
                labels,
                [r[3] for r in runs],
                "Cost by run",
                "cost",
                unit="$",
                empty=_no_cost([doc["cost"]["total"]], doc["cost"].get("requests_not_reported") or 0),
            )
        )
    parts.append(
        _table(
            ["run", "tokens in", "tokens out", "cost", "exit", "note"],
            [[r[0], r[1], r[2], money(r[3]), r[4], r[5]] for r in runs],
            numeric_from=1,
        )
    )
    if doc.get("redo"):
        from pipeline.report.redos import redo_sentences

        parts.append("<h2>Redone</h2>")
        parts += [f"<p class='note'>{escape(s)}</p>" for s in redo_sentences(doc["redo"])]
    parts.append("<h2>Answers and failures</h2>")
    reused = doc.get("reused") or {}
    if reused.get("requests"):
        parts.append(
            f"<p class='note'>{reused['requests']:,} result(s) reused from the answer cache, not sent: "
            f"{money(reused['cost_not_spent'])} not spent (in no cost above, which counts what was paid).</p>"
        )
    answers = doc["answers_by_status"]
    if answers:
        parts.append(
            bars(list(answers), list(answers.values()), "Answers by status (every attempt)", "answers")
        )
    errors = doc["errors_by_code"]
    if errors:
        parts.append(bars(list(errors), list(errors.values()), "Failures by code", "requests"))
    messages = doc.get("error_messages", {})
    parts.append(
        _table(
            ["code", "failures", "commonest messages"],
            [
                [c, n, " · ".join(f"{m} ({k:,})" for m, k in messages.get(c, {}).items())]
                for c, n in errors.items()
            ],
        )
        if errors
        else "<p class='note'>No request failed.</p>"
    )
    verdicts = doc["verdicts"]
    if verdicts:
        parts.append("<h2>Verdicts</h2>")
        parts.append(bars(list(verdicts), list(verdicts.values()), "Verdicts", "results"))
        parts.append(_table(["verdict", "results"], [[v, n] for v, n in verdicts.items()]))
    slowest = doc.get("slowest", [])
    parts.append("<h2>Slowest requests</h2>")
    parts.append(
        _table(["custom_id", "latency (s)"], [[i, round(s, 3)] for s, i in slowest])
        if slowest
        else "<p class='note'>None yet.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _status(doc: dict[str, Any], refresh: int | None) -> str:
    """Whether the page is the run's live view or its last word, and as of when (the
    time of the machine that wrote it, its zone named)."""
    try:
        when = dt.datetime.fromisoformat(str(doc["updated"])).astimezone().strftime("%H:%M:%S %Z")
    except ValueError:
        when = str(doc["updated"])
    if refresh is None:
        return f"<p class='status'>Final: written {_e(when)}; this page no longer reloads.</p>"
    return (
        f"<p class='status live'>Running: updated {_e(when)}, reloads every {int(refresh)} s. "
        "Should that time stop moving while no run ends, the run was stopped without writing its "
        "end: <code>pipeline report OUT</code> draws the folder's report again.</p>"
    )


# A live page's reload and status line, as `html_report` writes them (`stopped_page`).
_RELOAD = re.compile(r'<meta http-equiv="refresh" content="\d+">\n?')
_RUNNING = re.compile(r"<p class='status live'>.*?</p>", re.S)
_STOPPED = (
    "<p class='status'>Stopped: the run ended in an error before it wrote its end; this page no "
    "longer reloads. <code>pipeline report OUT</code> draws the folder's report again.</p>"
)


def stopped_page(page: str) -> str | None:
    """A live page (`html_report(..., refresh=N)`) made the last word of a run that ended
    without writing its end: no reload, and a status that says so; None for a page that is
    not live."""
    if not _RELOAD.search(page):
        return None
    return _RUNNING.sub(_STOPPED, _RELOAD.sub("", page, count=1), count=1)


def _by_run(
    doc: dict[str, Any], stretches: list[dict[str, Any]]
) -> list[tuple[str, int, int, float, Any, str]]:
    """Each run (a stretch of the timeline): its label, tokens in and out, cost, and the exit
    and note of its run record (none for a run killed before it could write one)."""
    records: dict[int, list[dict[str, Any]]] = {}  # by the second each started
    for run in doc["runs"]:
        try:
            started = dt.datetime.fromisoformat(str(run.get("started"))).timestamp()
        except ValueError:
            continue
        records.setdefault(round(started), []).append(run)
    out = []
    for stretch in stretches:
        points = stretch.get("points", [])
        shard = str(stretch.get("shard", ""))
        second = round(stretch["started"])
        near = [r for d in (0, -1, 1) for r in records.get(second + d, [])]
        # A merged set labels both by shard; a shard's own folder has its runs labelled only.
        run = next((r for r in near if not shard or str(r.get("shard", "")) == shard), {})
        moment = local(stretch["started"])
        when = f"{moment:%Y-%m-%d %H:%M:%S} {moment.tzname() or zone(moment)}"
        out.append(
            (
                f"{shard} {when}" if shard else when,
                sum(p["tokens_in"] for p in points),
                sum(p["tokens_out"] for p in points),
                sum(p["cost"] for p in points),
                run.get("exit", "killed?" if not run else ""),
                str(run.get("note", "")),
            )
        )
    return out
