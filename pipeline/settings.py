"""One frozen `Settings` for a run, built at the edge from a job file and flags.

The job file (`pipeline.jobfile`) gives the same keys as the command line's flags, plus
tables; flags override the file.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, SettingsError
from pipeline.input.body import near_parameter
from pipeline.input.shard import Shard, parse_shard
from pipeline.input.stdin import STDIN, STDIN_NAMES, is_stdin
from pipeline.jobfile import ModelLimit, check_limits, read_job_file
from pipeline.prices import Price, check_prices
from pipeline.urls import DEFAULT_BASE_URL, check_base_url, check_store_url

if TYPE_CHECKING:
    from pipeline.output.redo import Redo

DEFAULT_KEY_ENV = "LUMENFALL_API_KEY"
EMPTY: Mapping[str, Any] = MappingProxyType({})
# The batch tier's keys, and the values each may take (batch_poll: any number above 0).
TIERS = ("sync", "batch")
CHOICES: dict[str, tuple[str, ...]] = {"tier": TIERS, "batch_api": ("files", "inline"), "then": ("sync",)}
BATCH_KEYS = ("batch_api", "then", "batch_poll", "batch_max_lines", "batch_max_bytes")


@dataclass(frozen=True, kw_only=True)
class Settings:
    input: Path
    output: Path | None = None  # `pipeline estimate` needs none; a run asks for it, as `folder`
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_KEY_ENV
    model: str | None = None
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = 8  # at 8 % of attempts failing at random, one request in 600 million fails
    max_retry_time: float = 900.0  # seconds one request may spend retrying (refusals not counted)
    # Seconds an answer that is not streamed may take, whole: nothing arrives before it is
    # done, so only a total can bound it, and it must fit a long reasoning answer.
    timeout: float = 600.0
    idle_timeout: float = 60.0  # seconds a stream may send nothing before it counts as stalled
    give_up_after: float = 600.0  # seconds of only refusals, or only failures, before exit 3
    max_cost: float | None = None
    # The answer cache (`pipeline.cache`): answers kept in DIR, reused by any later run. Not in
    # the fingerprint: a folder may go on with or without it.
    cache: Path | None = None
    cache_max_gb: float | None = None
    # Lines that share a long prefix are sent close together, for the provider's prompt cache
    # (`pipeline.run.grouping`): only their order changes. Not in the fingerprint.
    reorder: bool = True
    # Markers for the provider's prompt cache on requests with a long shared prefix
    # (`pipeline.input.cachemarks`). Not in the fingerprint: they change no answer.
    prompt_cache: bool = False
    grace: float = 30.0  # seconds in-flight requests get after the first interrupt
    fresh: bool = False
    quiet: bool = False
    # Backoff before retry n is uniform in [0, min(backoff_max, backoff_base * 2**(n-1))],
    # and never shorter than the server's Retry-After.
    backoff_base: float = 0.1
    backoff_max: float = 30.0
    request: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    template: Mapping[str, Any] | None = None
    prices: Mapping[str, Price] = field(default_factory=lambda: EMPTY)
    limits: Mapping[str, ModelLimit] = field(default_factory=lambda: EMPTY)
    verdict: Mapping[str, Any] | None = None
    job_file: Path | None = None
    progress_interval: float = 60.0  # seconds between log lines when there is no terminal
    max_line_bytes: int = 32 * 1024 * 1024  # a longer input line is an input error, not a request
    warnings: tuple[str, ...] = ()  # what looks wrong but may be meant: said before the run
    shard: Shard | None = None  # this process runs one shard of N, into OUT/shard-K-of-N/
    shared_limit: str | None = None  # redis://HOST:PORT/DB: one pace for every process of the account
    # The tier: "sync" sends requests, "batch" sends them as provider batches at the batch price.
    # None of the batch keys below is in the fingerprint: a folder may go on at the other tier.
    tier: str = "sync"
    batch_api: str | None = None  # "files" or "inline"; None: the shape the endpoint offers
    then: str | None = None  # "sync": what batches left undone after their attempts is sent now
    batch_poll: float = 30.0  # seconds between looks at a running batch
    # A batch's most requests and bytes where the provider's are below the shape's own
    # (Azure's, Groq's, a gateway's); None: the shape's (`send.batchclient` refuses more)
    batch_max_lines: int | None = None
    batch_max_bytes: int | None = None
    # What a batch taken in left at the provider (its files, or the inline batch) is deleted
    # (`pipeline.batch.clear`); true: kept there, for those who audit at the provider
    batch_keep_files: bool = False
    # `--redo WHAT` (`pipeline.output.redo`): lines of the folder sent again, the request
    # defaults free to change for them. A flag only, and not in the fingerprint.
    redo: Redo | None = None
    # Prometheus metrics served while the run goes (`pipeline.run.metrics`), on every
    # interface unless `metrics_host` names one. Not in the fingerprint.
    metrics_port: int | None = None
    metrics_host: str | None = None

    @property
    def folder(self) -> Path:
        """The output folder of a run (a shard's: OUT/shard-K-of-N/)."""
        if self.output is None:
            raise SettingsError("no output given: pass --output or set output in the job file")
        return self.output / self.shard.folder if self.shard is not None else self.output

    def api_key(self) -> str | None:
        """The key, read from the environment when needed; it is never stored here."""
        return os.environ.get(self.api_key_env) or None

    @property
    def default_model(self) -> str | None:
        model = self.request.get("model", self.model)
        return model if isinstance(model, str) else None

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs the same job, so that one may resume the other."""
        return {
            "input": "-" if is_stdin(self.input) else str(self.input.resolve()),
            "model": self.default_model,
            # The model is above, wherever it was set (a flag, [request], the top level).
            "request": {k: v for k, v in self.request.items() if k != "model"},
            "template": dict(self.template) if self.template is not None else None,
            **({"shard": [self.shard.k, self.shard.n]} if self.shard is not None else {}),
        }


SETTING_NAMES = {f.name for f in fields(Settings)}


def build(job_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from an optional job file and flags (a flag set to None is not given)."""
    values: dict[str, Any] = read_job_file(job_file) if job_file is not None else {}
    for key, value in flags.items():
        if key not in SETTING_NAMES:
            raise SettingsError(f"unknown setting '{key}'")
        if value is not None:
            values[key] = value
    where = str(job_file) if job_file is not None else "command line"
    if not values.get("input"):
        raise SettingsError("no input given: pass --input or set input in the job file")
    today = dt.date.today().isoformat()
    raw = str(values["input"])
    values["input"] = STDIN if raw in STDIN_NAMES else Path(os.path.expanduser(raw))
    if values["input"] == STDIN and raw not in STDIN_NAMES:
        values["input"] = values["input"].absolute()  # `./-`: a file of that name, not stdin
    if values.get("output"):
        values["output"] = Path(os.path.expanduser(str(values["output"]).replace("{date}", today)))
    if values.get("cache"):
        values["cache"] = Path(os.path.expanduser(str(values["cache"])))
    else:
        values.pop("cache", None)
        if flags.get("cache_max_gb") is not None:  # (a job file may keep it for the runs with one)
            raise SettingsError(
                "command line: --cache-max-gb bounds the answer cache, and this run has none: "
                'give --cache DIR too (or cache = "DIR" in the job file)'
            )
    if isinstance(values.get("redo"), str):
        from pipeline.output.redo import parse_redo

        if values.get("fresh"):
            raise SettingsError(
                "command line: --redo sends some lines of the folder again and --fresh all of them "
                "(its old files moved aside): give one of the two"
            )
        values["redo"] = parse_redo(values["redo"])
    values["base_url"] = check_base_url(str(values.get("base_url", DEFAULT_BASE_URL)))
    check_key_env(values.get("api_key_env", DEFAULT_KEY_ENV))
    _check_numbers(values, lambda key: "command line" if flags.get(key) is not None else where)
    _check_tier(values, flags, where)
    if flags.get("metrics_host") is not None and values.get("metrics_port") is None:
        raise SettingsError("--metrics-host is where the metrics are served: give --metrics-port too")
    if isinstance(values.get("shard"), str):
        values["shard"] = parse_shard(values["shard"])
    if values.get("shared_limit") is not None:
        values["shared_limit"] = check_store_url(str(values["shared_limit"]))
    if "prices" in values:
        values["prices"] = check_prices(where, values["prices"])  # read-only, with the batch prices
    if "limits" in values:
        values["limits"] = MappingProxyType(check_limits(where, values["limits"]))
    request = dict(values.get("request", {}))
    if flags.get("model") is not None:
        request.pop("model", None)  # the flag beats the job file (a line's own model beats both)
    if "messages" in request:
        raise SettingsError(f"{where}: [request] cannot set 'messages'; they come from each line")
    # The defaults go into every body after the line is checked: checked here, once, as a
    # line's own fields are, they are a settings error, not a crash on every line.
    from pipeline.input.body import check_body

    try:
        check_body({**request, "messages": [{"role": "user"}]}, "[request] ")
    except InputError as e:
        raise SettingsError(f"{where}: {e.message}") from None
    values["request"] = MappingProxyType(request)
    values["warnings"] = tuple(
        f"{where}: [request] '{key}' is not a parameter the API knows; did you mean '{near}'? "
        "(it is sent as written)"
        for key in request
        if (near := near_parameter(key)) is not None
    ) + _batch_price_warnings(values, where)
    if values.get("template") is not None:
        # Compile once here so that a broken template is a settings error, not N line errors.
        from pipeline.input.template import compile_template

        compile_template(values["template"], where=where)
    if values.get("verdict") is not None:
        from pipeline.send.verdict import compile_verdict

        compile_verdict(values["verdict"], values["request"], where=where)
    return Settings(**values)


def check_key_env(key_env: Any) -> str:
    """The name of the variable that holds the key (never the key: it is not echoed)."""
    if not isinstance(key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        # Never echo it: someone may have passed the key itself.
        raise SettingsError(
            "api_key_env must be the name of an environment variable (letters, digits and _), "
            "such as LUMENFALL_API_KEY; the key itself goes in that variable"
        )
    return key_env


def _check_tier(values: dict[str, Any], flags: Mapping[str, Any], where: str) -> None:
    for key, choices in CHOICES.items():
        value = values.get(key)
        if value is not None and value not in choices:
            source = "command line" if flags.get(key) is not None else where
            said = " or ".join(f'"{c}"' for c in choices)
            raise SettingsError(f"{source}: {key} must be {said}, not {value!r}")
    if values.get("tier", "sync") == "batch":
        return
    # A job file may keep the batch tier's keys for the runs that use it (`--tier batch`); a
    # flag of the batch tier given to a synchronous run would be silently ignored: refused.
    for key in BATCH_KEYS:
        if flags.get(key) is not None:
            flag = "--" + key.replace("_", "-")
            raise SettingsError(
                f'{flag} is for the batch tier: add --tier batch (or tier = "batch" in the job '
                f"file), or leave {flag} out"
            )


def _batch_price_warnings(values: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if values.get("tier") != "batch" or not values.get("prices"):
        return ()
    from pipeline.account.cost import unpriced_batches

    models = unpriced_batches(values["prices"])
    if not models:
        return ()
    which = ": costs" if len(models) == len(values["prices"]) else f" for {', '.join(models)}: their costs"
    return (
        f"{where}: [prices] says nothing of batches{which} are shown at the synchronous price, an "
        "upper bound; add batch = 0.5 (the share of each price a batch pays) to [prices], "
        "or batch_prompt and batch_completion to a model's table",
    )


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past a float's range (TOML sets no bound)
        return False


def _check_numbers(values: dict[str, Any], source: Callable[[str], str]) -> None:
    def positive(key: str, *, integer: bool = False) -> None:
        value = values.get(key)
        if value is None:
            return
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or not _finite(value) or value <= 0:
            kind = "a whole number" if integer else "a number"
            raise SettingsError(f"{source(key)}: {key} must be {kind} above 0, not {value!r}")

    positive("concurrency", integer=True)
    positive("max_attempts", integer=True)
    positive("max_line_bytes", integer=True)
    positive("batch_max_lines", integer=True)
    positive("batch_max_bytes", integer=True)
    positive("metrics_port", integer=True)
    if (values.get("metrics_port") or 0) > 65535:
        raise SettingsError(f"{source('metrics_port')}: metrics_port must be a port, 1 to 65535")
    for key in (
        "rpm",
        "tpm",
        "timeout",
        "idle_timeout",
        "give_up_after",
        "max_retry_time",
        "max_cost",
        "cache_max_gb",
        "grace",
        "batch_poll",
    ):
        positive(key)
    for key in ("backoff_base", "backoff_max"):
        value = values.get(key)
        if value is not None and (not isinstance(value, int | float) or not _finite(value) or value < 0):
            raise SettingsError(f"{source(key)}: {key} must be a number of seconds, 0 or more")
