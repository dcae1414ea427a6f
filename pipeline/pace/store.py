"""The account's shared pace in Redis: its state, and the one call that leases from it.

One Lua script a call (a lease, or a sync when no lease is wanted), atomic in the store, on
the store's own clock (TIME), so that the machines' clocks never meet. Under a key that names
the account by a hash (never the API key) it keeps the virtual clocks of the account's starts
and tokens, the rate in force (given, found, or a ramp before either), a pause, the processes
seen lately and the account's answers by second; everything expires when unused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import anyio

from pipeline.errors import SettingsError
from pipeline.settings import redacted

KEY_TTL = 600  # seconds an account's state outlives its last process
BOOT_RATE = 16.0  # starts a second for the account before any limit is known, doubling

# One call per lease or sync. Times are the store's (TIME), so machines' clocks never meet.
_SCRIPT = """
local key, members, answers = KEYS[1], KEYS[2], KEYS[3]
local pid = ARGV[1]
local want, want_tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local given, given_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local found, pause_for = tonumber(ARGV[6]), tonumber(ARGV[7])
local answered, ttl = tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local second = math.floor(now)
redis.call('HSET', members, pid, tostring(now))
if answered > 0 then
  redis.call('HINCRBY', answers, tostring(second), answered)
end
local seen, all = 0, redis.call('HGETALL', members)
for i = 1, #all, 2 do
  local at = tonumber(all[i + 1])
  if now - at < 5 then seen = seen + 1 elseif now - at > 60 then redis.call('HDEL', members, all[i]) end
end
local recent, last, counts = 0, 0, redis.call('HGETALL', answers)
for i = 1, #counts, 2 do
  local s = tonumber(counts[i])
  if s >= second - 3 and s < second then recent = recent + tonumber(counts[i + 1]) end
  if s >= second - 2 and s < second then last = math.max(last, tonumber(counts[i + 1])) end
  if s < second - 10 then redis.call('HDEL', answers, counts[i]) end
end
if found >= 0 then redis.call('HSET', key, 'found', tostring(found), 'found_by', pid) end
local leads = (redis.call('HGET', key, 'found_by') or pid) == pid
local rate, booting = given, 0
local paused = tonumber(redis.call('HGET', key, 'paused') or '0')
if rate <= 0 then rate = tonumber(redis.call('HGET', key, 'found') or '0') end
if rate <= 0 and given <= 0 then
  -- No limit given and none found yet: the account ramps up as one, from a few starts a
  -- second, doubling every quarter second while nothing is refused.
  booting = 1
  rate = tonumber(redis.call('HGET', key, 'boot') or ARGV[10])
  local at = tonumber(redis.call('HGET', key, 'boot_at') or tostring(now))
  if paused < now and now - at >= 0.25 then
    rate = math.min(rate * 2, 100000)
    at = now
  end
  redis.call('HSET', key, 'boot', tostring(rate), 'boot_at', tostring(at))
end
if pause_for > 0 and now + pause_for > paused then
  paused = now + pause_for
  redis.call('HSET', key, 'paused', tostring(paused))
end
local start, token_start = -1, -1
if want > 0 and rate > 0 then
  start = math.max(tonumber(redis.call('HGET', key, 'clock') or '0'), now, paused)
  redis.call('HSET', key, 'clock', tostring(start + want / rate))
end
if want_tokens > 0 and given_tokens > 0 then
  token_start = math.max(tonumber(redis.call('HGET', key, 'token_clock') or '0'), now, paused)
  redis.call('HSET', key, 'token_clock', tostring(token_start + want_tokens / given_tokens))
end
redis.call('EXPIRE', key, ttl)
redis.call('EXPIRE', members, ttl)
redis.call('EXPIRE', answers, 60)
return {tostring(now), tostring(rate), tostring(start), tostring(token_start), tostring(paused),
        tostring(seen), tostring(recent), tostring(last), leads and '1' or '0', tostring(booting)}
"""


def account_key(base_url: str, api_key: str | None) -> str:
    """The account's name in the store: a hash of where requests go and with which key."""
    digest = hashlib.sha256(f"{base_url}\0{api_key or ''}".encode()).hexdigest()[:24]
    return f"pipeline:pace:{digest}"


class StoreAway(Exception):
    """The store cannot be reached now; `reason` names how, without the URL (its password)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    now: float  # the store's clock
    rate: float  # the account's rate in force (0: none)
    start: float  # where the leased starts begin, on the store's clock (-1: none leased)
    token_start: float
    paused: float  # the account's pause lasts till then
    members: int  # processes seen lately
    recent: int  # the account's answers in its last three whole seconds
    last: int  # the same in the busier of its last two
    leads: bool  # the rate in force is this process's reading
    booting: bool  # no limit given or found: the rate is the ramp's


class Store:
    def __init__(self, url: str, account: str) -> None:
        self.url = url
        self.account = account
        try:
            import redis.asyncio as redis
        except ImportError:
            raise SettingsError(
                "--shared-limit needs the Redis client: pip install 'pipeline[shared]' (make installs it)"
            ) from None
        self._client: Any = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._script = self._client.register_script(_SCRIPT)

    async def check(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.ping()
        except (RedisError, OSError) as e:
            raise SettingsError(
                f"cannot reach the shared limit's store {redacted(self.url)} ({type(e).__name__}); "
                "check --shared-limit, or run without it to pace this process alone"
            ) from None

    async def call(
        self,
        pid: str,
        *,
        want: int,
        want_tokens: float,
        given: float,
        given_tokens: float,
        found: float | None,
        pause_for: float,
        answered: int,
    ) -> Reply:
        from redis.exceptions import RedisError

        keys = [self.account, f"{self.account}:members", f"{self.account}:answers"]
        args: list[Any] = [
            pid,
            want,
            want_tokens,
            given,
            given_tokens,
            -1 if found is None else found,
            pause_for,
        ]
        try:
            raw = await self._script(keys=keys, args=[*args, answered, KEY_TTL, BOOT_RATE])
        except (RedisError, OSError) as e:
            raise StoreAway(type(e).__name__) from None
        now, rate, start, token_start, paused, members, recent, last, leads, booting = (float(x) for x in raw)
        return Reply(
            now,
            rate,
            start,
            token_start,
            paused,
            int(members),
            int(recent),
            int(last),
            bool(leads),
            bool(booting),
        )

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.aclose()
