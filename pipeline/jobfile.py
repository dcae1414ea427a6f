"""A job file: TOML with the same keys as the command line's flags, plus tables.

`[request]` (defaults merged into every body; a value in the line wins), `[template]` (how a
record line becomes a request), `[prices]` (dollars per million tokens, per model, and what a
batch pays: `batch`, the share of every price, or a model's own `batch_prompt` and
`batch_completion`; checked by `pipeline.prices`), `[limits]`
(a model's own rpm and tpm, where its provider limits models separately) and `[verdict]` (how a
structured reply is checked and counted). Read and checked here, key by key, so that a mistake
is one line that names the file and the key; `pipeline.settings` merges it with the flags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.errors import SettingsError


class ModelLimit(NamedTuple):
    """A model's own limits, per minute (`[limits."vendor/model"]`): a scope of its own, paced
    beside the account's `--rpm`/`--tpm`."""

    rpm: float | None = None
    tpm: float | None = None


# Keys a job file may set at the top level, with the type each must have.
_SCALARS: dict[str, tuple[type, ...]] = {
    "input": (str,),
    "output": (str,),
    "base_url": (str,),
    "api_key_env": (str,),
    "model": (str,),
    "concurrency": (int,),
    "rpm": (int, float),
    "tpm": (int, float),
    "max_attempts": (int,),
    "max_retry_time": (int, float),
    "timeout": (int, float),
    "idle_timeout": (int, float),
    "give_up_after": (int, float),
    "max_cost": (int, float),
    "cache": (str,),
    "cache_max_gb": (int, float),
    "prompt_cache": (bool,),
    "grace": (int, float),
    "quiet": (bool,),
    "reorder": (bool,),
    "backoff_base": (int, float),
    "backoff_max": (int, float),
    "max_line_bytes": (int,),
    "shard": (str,),
    "shared_limit": (str,),
    "tier": (str,),
    "batch_api": (str,),
    "then": (str,),
    "batch_poll": (int, float),
    "batch_max_lines": (int,),
    "batch_max_bytes": (int,),
    "batch_keep_files": (bool,),
    "metrics_port": (int,),
    "metrics_host": (str,),
}
_TABLES = ("request", "template", "prices", "limits", "verdict")
_KNOWN = tuple(_SCALARS) + _TABLES


def unknown_key(where: str, key: str, known: tuple[str, ...]) -> SettingsError:
    import difflib  # (a run without a mistake in its job file never needs it)

    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
    return SettingsError(f"{where}: unknown key '{key}'{hint}")


def read_job_file(path: Path) -> dict[str, Any]:
    """Parse and check a job file; relative paths in it are relative to the file."""
    import tomllib  # (a run given by flags alone, as the bench's, reads no TOML)

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: job file not found") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the job file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "redo":
            raise SettingsError(
                f"{path}: redo is a flag only (--redo WHAT): kept in a job file, it would send "
                "those lines again at every run"
            )
        if key not in _KNOWN:
            raise unknown_key(str(path), key, _KNOWN)
        if key in _TABLES:
            if not isinstance(value, dict):
                raise SettingsError(f"{path}: '{key}' must be a table, like [{key}]")
            out[key] = value
            continue
        types = _SCALARS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise SettingsError(f"{path}: '{key}' must be {want}, not {value!r}")
        out[key] = value
    for key in ("input", "output", "cache"):
        if key in out and not (key == "input" and out[key] == "-"):  # (standard input)
            out[key] = _relative_to(path.parent, out[key])
    out["job_file"] = path
    return out


def _relative_to(base: Path, value: str) -> str:
    expanded = Path(os.path.expanduser(value))
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def check_limits(where: str, raw: Mapping[str, Any]) -> dict[str, ModelLimit]:
    limits: dict[str, ModelLimit] = {}
    for model, entry in raw.items():
        table = f'{where}: [limits."{model}"]'
        if not isinstance(entry, dict):
            raise SettingsError(f"{table} must be a table like {{ rpm = 20, tpm = 40000 }} (per minute)")
        for key, value in entry.items():
            if key not in ("rpm", "tpm"):
                raise unknown_key(table, key, ("rpm", "tpm"))
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise SettingsError(f"{table} {key} must be a number above 0, not {value!r}")
        if not entry:
            raise SettingsError(f"{table} gives no limit: set rpm, tpm or both")
        limits[model] = ModelLimit(entry.get("rpm"), entry.get("tpm"))
    return limits
