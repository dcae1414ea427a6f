"""A batch that failed validation (status `failed`, nothing run, `errors`): the lines its
errors name, read back from the batch's staged file (the very file uploaded, so its line
positions are the provider's). OpenAI's `errors.data[].line` counts the file's lines from 1
(a file of one line that is no JSON is `line: 1`; the mock counts so too).

Each line named fails with its own error; the batch's other lines were never run and go
again, spending no try (each such batch fails the lines it names: fewer go each time), but
for a batch with MANY errors, whose other lines go again as an expired batch's do. Where an
error names no line (the inline shape's one `error.message`, a file-wide error such as a
file too large) or a line the file does not have, what the errors blame cannot be told
apart: every line fails with the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import orjson

from pipeline.send.batchapi import Flaw

# What a JSON string may hold raw that some readers take for the end of a line (Python's
# `str.splitlines`: U+2028, U+2029, NEL). Every line of the file is JSON, ours: a provider that
# says one is not (`invalid_json_line`), past a line holding one of these, cut it there, and
# numbered the lines after it otherwise.
_BREAKS = ("\u2028".encode(), "\u2029".encode(), "\x85".encode())
_NOT_JSON = "invalid_json_line"

# Errors listed at once from which they may be a provider's first ones only, and every line
# at fault: the others then spend a try in going again, as an expired batch's do, so that a
# file flawed throughout is not sent back a hundred lines shorter each time without end.
MANY = 100


def named(path: Path, flaws: Sequence[Flaw]) -> dict[str, list[Flaw]] | None:
    """The ids of the lines the flaws name, each with its flaws (a line may break more than
    one rule); None where they do not all name a line of the file, or may have been counted
    otherwise (`_BREAKS`)."""
    wanted: dict[int, list[Flaw]] = {}
    for flaw in flaws:
        if flaw.line is None or flaw.line < 1:
            return None
        wanted.setdefault(flaw.line, []).append(flaw)
    if not wanted:
        return None
    last = max(wanted)
    cut = any(flaw.code == _NOT_JSON for flaw in flaws)  # (then its numbers may not be ours)
    found: dict[str, list[Flaw]] = {}
    met = 0
    try:
        with path.open("rb") as f:
            for number, data in enumerate(f, 1):
                if cut and number < last and any(mark in data for mark in _BREAKS):
                    return None
                if number in wanted:
                    custom_id = orjson.loads(data).get("custom_id")
                    if not isinstance(custom_id, str):
                        return None
                    found.setdefault(custom_id, []).extend(wanted[number])
                    met += 1
                if number >= last:
                    break
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None  # (the file is ours, and whole: not met but by a hand on the folder)
    return found if met == len(wanted) else None
