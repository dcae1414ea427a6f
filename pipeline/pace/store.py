"""The account's shared pace in Redis: its state, and the calls that lease from it and read it.

One Lua script a call (`store.lua`: a lease, or a sync when no lease is wanted), atomic in the
store, on the store's own clock (TIME), so that the machines' clocks never meet. Under a key
that names the account by a hash (never the API key) it keeps the virtual clocks of the
account's starts and tokens, the rate in force (given, found, or a ramp before either), a
pause, the processes seen lately, and the account's log: requests sent and refused by the
hundredth of a second they left in, and admitted by the hundredth the server let them through,
from every process, so that a limit is read from what the whole account got through (`read`). Everything expires when unused. The same rules, in Python, are
the Ray actor's (`pipeline.pace.account`); a replay test holds the two equal.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, NamedTuple, Protocol

import anyio

from pipeline.errors import SettingsError
from pipeline.urls import redacted

KEY_TTL = 600  # seconds an account's state outlives its last process
LOG_TTL = 180  # seconds the account's send log is kept, a second to a key
BOOT_RATE = 64.0  # starts a second for the account before any limit is known, growing...
GROW = 2 ** (2 / 3)  # ...so much every quarter second (doubling every 3/8 s): see store.lua
SIT = 2.0  # seconds of refusals too few for a run after which the ramp grows through them
WATCH = 2.0  # seconds of the account's send log watched for a run of refusals...
RUN = 4  # ...of at least so many, and half what was sent since the first: the server is full;
SHARE = 4  # or, refused for a second or more, a SHARE (a quarter) of it: see store.lua


@dataclass(frozen=True, slots=True)
class Ask:
    """One call to the account's pace: lease `want` starts and `want_tokens` tokens (either
    may be 0), publish a rate `found` and a pause, and add `log` ("hundredth sent refused
    room admitted" fives, `pipeline.pace.accountlog`) to the account's log."""

    pid: str  # the process asking
    want: int = 0
    want_tokens: float = 0.0
    given: float = 0.0  # the account's rates as given (0: none)
    given_tokens: float = 0.0
    found: float | None = None
    pause_for: float = 0.0
    log: str = ""
    holds: bool = False  # the process still holds leased starts (it may send without calling)
    answered: int = 0  # its requests let through since its last call (the ramp grows on them)
    whole: float = -1.0  # its admissions are told up to then (the store's clock; -1: no request out)


@dataclass(frozen=True, slots=True)
class Reply:
    now: float  # the store's clock
    rate: float  # the account's rate in force (0: none)
    start: float  # where the leased starts begin, on the store's clock (-1: none leased)
    token_start: float
    paused: float  # the account's pause lasts till then
    members: int  # processes seen lately
    leads: bool  # the rate in force is this process's reading, or of one not seen for 5 s
    booting: bool  # no limit given or found: the rate is the ramp's
    full_at: float  # the account's last run of refusals began with a request sent then (-1: none)
    full_resume: float  # and the server said it had room again then
    granted: int  # starts leased (no more than a tenth of a second of the rate)
    # The store holds every process's log up to then, what it sent and what the server admitted
    # (a process holding no starts, no request out, has told all): a reading up to then is whole.
    reported: float = math.inf


class Logged(NamedTuple):
    """The account's log over a span of the store's clock."""

    sent: int
    refused: int  # of those sent
    admitted: int  # let through in the span (as their answers tell), whenever sent


_KINDS = (float, float, float, float, float, int, bool, bool, float, float, int, float)  # Reply's


class AccountStore(Protocol):
    """Where the account's shared pace is kept: Redis (`Store`), or a Ray actor
    (`pipeline.pace.actor.ActorStore`). A shared pace (`pipeline.pace.link`) opens one for its run."""

    async def check(self) -> None: ...

    async def call(self, ask: Ask) -> Reply: ...

    async def read(self, since: float, until: float) -> Logged:
        """The account's log from `since` to `until` (the store's clock)."""
        ...

    async def close(self) -> None: ...


def account_key(base_url: str, api_key: str | None) -> str:
    """The account's name in the store: a hash of where requests go and with which key."""
    digest = hashlib.sha256(f"{base_url}\0{api_key or ''}".encode()).hexdigest()[:24]
    return f"pipeline:pace:{digest}"


class StoreAway(Exception):
    """The store cannot be reached now; `reason` names how, without the URL (its password)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _lua(name: str) -> str:
    return files("pipeline.pace").joinpath(name).read_text(encoding="utf-8")


class Store:
    def __init__(self, url: str, account: str) -> None:
        self.url = url
        self.account = account
        try:
            import redis.asyncio as redis
        except ImportError:
            raise SettingsError(
                "--shared-limit needs the Redis client: pip install 'chat-pipeline[shared]' (make installs it)"
            ) from None
        self._client: Any = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._call = self._client.register_script(_lua("store.lua"))
        self._read = self._client.register_script(_lua("store_read.lua"))

    async def check(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.ping()
        except (RedisError, OSError) as e:
            raise SettingsError(
                f"cannot reach the shared limit's store {redacted(self.url)} ({type(e).__name__}); "
                "check --shared-limit, or run without it to pace this process alone"
            ) from None

    async def call(self, ask: Ask) -> Reply:
        a, found = ask, -1 if ask.found is None else ask.found
        args = [a.pid, a.want, a.want_tokens, a.given, a.given_tokens, found, a.pause_for, a.log]
        args += [int(a.holds), a.answered, a.whole, KEY_TTL, BOOT_RATE, LOG_TTL, WATCH, RUN, GROW, SIT, SHARE]
        raw = await self._script(self._call, [self.account, f"{self.account}:members"], args)
        return Reply(*(kind(float(x)) for kind, x in zip(_KINDS, raw, strict=True)))

    async def read(self, since: float, until: float) -> Logged:
        raw = await self._script(self._read, [self.account], [int(since * 100), int(until * 100)])
        return Logged(*(int(x) for x in raw))

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreAway(type(e).__name__) from None

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.aclose()
