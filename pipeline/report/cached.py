"""What the provider's prompt cache did, for report.md and report.html: per model and in all,
the share of prompt tokens read from it, the tokens written to it, what it saved and what the
writes cost above the prompt price. Shown only where a model read or wrote (a run with no
cached token shows nothing of it).

The saving is the cached tokens at the prompt price, less at the `cached` price of the job's
`[prices]`; the writes' extra, the written tokens at the `cache_write` price, less at the
prompt price (Anthropic's 1.25x where the table states none for its models). Both come from
the table, whoever stated the cost (the server's `usage.cost` holds them already); an answer
that read from the cache with no `cached` price for its model has a saving not known, never $0.
"""

from __future__ import annotations

from typing import Any

from pipeline.account.cost import money

HEAD = ["model", "prompt", "cached", "share cached", "written", "saved", "writes' extra", "net saved"]


def _cached(figures: dict[str, Any]) -> bool:
    cache = figures.get("prompt_cache") or {}
    return bool(cache.get("cached_tokens") or cache.get("cache_write_tokens"))


def _dollars(value: float, tokens: int, unknown: int) -> str:
    """A figure of the table: none where no token made it, not known where none could be
    priced (never a silent $0), else with the answers it leaves out."""
    if not tokens:
        return "–"
    if unknown:
        return f"{_signed(value)} + {unknown:,} not known" if value else "not known"
    return _signed(value)


def _signed(value: float) -> str:
    """Dollars, a loss with its sign ahead (-$0.0010, not $-0.0010)."""
    return "-" + money(-value) if value < 0 else money(value)


def _net(cache: dict[str, Any]) -> float | None:
    """What the cache saved less what its writes cost above the prompt price (None: one of
    them is not known, or neither was made)."""
    read, written = cache["cached_tokens"], cache["cache_write_tokens"]
    if not (read or written) or (read and cache.get("answers_not_priced")):
        return None
    if written and cache.get("writes_not_priced"):
        return None
    return float(cache["saved"]) - float(cache["write_extra"])


def cache_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """The table's rows (HEAD): each model that read or wrote, then all, where more than one
    did; none when no model did."""
    named = [(name, m) for name, m in doc["models"].items() if _cached(m)]
    if not named:
        return []
    if len(named) > 1:
        named.append(("all", {"prompt_tokens": doc["tokens"]["prompt_tokens"], **doc}))
    rows = []
    for name, m in named:
        cache = m["prompt_cache"]
        share = cache["share_cached"]
        rows.append(
            [
                name,
                m["prompt_tokens"],
                cache["cached_tokens"],
                "–" if share is None else f"{share:.1%}",
                cache["cache_write_tokens"],
                _dollars(cache["saved"], cache["cached_tokens"], cache.get("answers_not_priced", 0)),
                _dollars(
                    cache["write_extra"], cache["cache_write_tokens"], cache.get("writes_not_priced", 0)
                ),
                "not known" if (net := _net(cache)) is None else _signed(net),
            ]
        )
    return rows


def cache_notes(doc: dict[str, Any]) -> list[str]:
    """What the table's figures are, and what is not known of them."""
    cache = doc.get("prompt_cache") or {}
    out = [
        "Saved: the cached tokens at the prompt price, less at the [prices] `cached` price; writes' "
        "extra: the written tokens at the `cache_write` price, less at the prompt price; net saved: "
        "the one less the other. By the job's [prices]; the cost above is what was spent, with them."
    ]
    net = _net(cache) if cache else None
    if net is not None and net < 0:
        out.append(
            f"The prompt cache cost {_signed(-net)} more than it saved: what was written to it was "
            "read too seldom (lines of one prefix sent minutes apart, or a prefix no other line "
            "shares); without prompt_cache, or with such lines sent together, it would not."
        )
    unknown = cache.get("answers_not_priced") or 0
    if unknown:
        out.append(
            f"{unknown:,} answer(s) read from the cache of a model [prices] gives no `cached` price (or "
            "none at all): their saving is not known, and where the table costs them, their cached "
            "tokens count at the full prompt price (an upper bound); add cached = ... to the model's "
            "[prices] entry."
        )
    unknown = cache.get("writes_not_priced") or 0
    if unknown:
        out.append(
            f"{unknown:,} answer(s) wrote to the cache for a model [prices] has no price for: what "
            "their writes cost above the prompt price is not known."
        )
    return out


def cache_section(doc: dict[str, Any]) -> list[str]:
    """report.md's lines for it (none where no model read or wrote)."""
    rows = cache_rows(doc)
    if not rows:
        return []
    out = [
        "",
        "## Prompt cache",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|---|" + "---:|" * (len(HEAD) - 1),
    ]
    for row in rows:
        cells = [f"{c:,}" if isinstance(c, int) else str(c) for c in row]
        name = " ".join(str(row[0]).replace("\\", "\\\\").replace("|", "\\|").split())
        cells[0] = "**all**" if row is rows[-1] and len(rows) > 1 else name
        out.append("| " + " | ".join(cells) + " |")
    for note in cache_notes(doc):
        out += ["", note]
    return out
