"""The account's shared pace in Redis: its state, and the calls that lease from it and read it.

One Lua script a call (a lease, or a sync when no lease is wanted), atomic in the store, on
the store's own clock (TIME), so that the machines' clocks never meet. Under a key that names
the account by a hash (never the API key) it keeps the virtual clocks of the account's starts
and tokens, the rate in force (given, found, or a ramp before either), a pause, the processes
seen lately, and the account's send log: requests sent and refused by the hundredth of a
second they left in, from every process, so that a limit is read from what the whole account
sent (`read`). Everything expires when unused.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from pipeline.errors import SettingsError
from pipeline.urls import redacted

KEY_TTL = 600  # seconds an account's state outlives its last process
LOG_TTL = 180  # seconds the account's send log is kept, a second to a key
BOOT_RATE = 16.0  # starts a second for the account before any limit is known, doubling
WATCH = 2.0  # seconds of the account's send log watched for a run of refusals...
RUN = 4  # ...of at least so many, and half what was sent since the first: the server is full

# One call per lease or sync. Times are the store's (TIME), so machines' clocks never meet.
# Nothing here scans more than the call brings, but for a run of refusals, looked for only when
# the call tells of a refusal (none, at a pace the server takes): a call costs a few commands.
_SCRIPT = """
local key, members = KEYS[1], KEYS[2]
local pid = ARGV[1]
local want, want_tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local given, given_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local found, pause_for = tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local holds = ARGV[14] == '1'
local answered = tonumber(ARGV[15])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cs_now = math.floor(now * 100)
local state = redis.call('HMGET', key, 'found', 'found_by', 'paused', 'full_at', 'full_resume', 'boot', 'boot_at',
                         'boot_ok', 'refused_at', 'clock', 'token_clock')
local paused = tonumber(state[3] or '0')
local full_at, full_resume = tonumber(state[4] or '-1'), tonumber(state[5] or '-1')
local boot_at = tonumber(state[7] or tostring(now))
local boot_ok, refused_at = tonumber(state[8] or '0') + answered, tonumber(state[9] or '0')
-- The send log: "hundredth sent refused room" quads, counted under a key a second (room: the
-- earliest time, in hundredths, that a refusal of a request sent then said the server has
-- room again; 0: none).
local told_refusal, written = false, {}
for cs, sent, refused, room in string.gmatch(ARGV[10], '(%d+) (%d+) (%d+) (%d+)') do
  local log = key .. ':log:' .. math.floor(tonumber(cs) / 100)
  written[log] = true
  if sent ~= '0' then redis.call('HINCRBY', log, 's' .. cs, sent) end
  if refused ~= '0' then
    redis.call('HINCRBY', log, 'r' .. cs, refused)
    told_refusal = true
  end
  if room ~= '0' then
    local was = tonumber(redis.call('HGET', log, 'w' .. cs) or room)
    redis.call('HSET', log, 'w' .. cs, math.min(was, tonumber(room)))
  end
end
if told_refusal then
  refused_at = now
  redis.call('HSET', key, 'refused_at', tostring(now))
end
for log, _ in pairs(written) do redis.call('EXPIRE', log, ARGV[11]) end
if found >= 0 then redis.call('HSET', key, 'found', tostring(found), 'found_by', pid) end
local leads = found >= 0 or (state[2] or pid) == pid
local rate, booting = given, 0
if pause_for > 0 and now + pause_for > paused then
  paused = now + pause_for
  redis.call('HSET', key, 'paused', tostring(paused))
end
if given <= 0 and told_refusal then
  -- The account's server is full: most of what the account sent since its first refusal of
  -- the last WATCH seconds was refused (refusals come back in milliseconds, and every process
  -- tells them at once). Each process sees only its own share of such a run: sixteen of
  -- them would each take sixteen times as long to see one. The account pauses till the
  -- earliest time a refusal of the run said the server has room again (a scattered refusal
  -- among them may ask for longer). Looked for only when a refusal comes in.
  local from = math.max(cs_now - math.floor(ARGV[12] * 100), math.ceil(full_resume * 100))
  local sent, refused, room = {}, {}, {}
  local kinds = {s = sent, r = refused, w = room}
  for second = math.floor(from / 100), math.floor(cs_now / 100) do
    local counts = redis.call('HGETALL', key .. ':log:' .. second)
    for i = 1, #counts, 2 do
      local cs = tonumber(string.sub(counts[i], 2))
      if cs >= from then kinds[string.sub(counts[i], 1, 1)][cs] = tonumber(counts[i + 1]) end
    end
  end
  -- Back from the latest hundredth: the earliest one from which on at least RUN requests
  -- were refused, and half of what was sent (a scattered refusal before the run does not
  -- hold it back, nor do refusals that come back slowly fall out of the window).
  local hundredths = {}
  for cs, _ in pairs(sent) do hundredths[#hundredths + 1] = cs end
  for cs, _ in pairs(refused) do if not sent[cs] then hundredths[#hundredths + 1] = cs end end
  table.sort(hundredths)
  local first, told, n_sent, n_refused, low = nil, nil, 0, 0, nil
  for i = #hundredths, 1, -1 do
    local cs = hundredths[i]
    n_sent, n_refused = n_sent + (sent[cs] or 0), n_refused + (refused[cs] or 0)
    if room[cs] and (low == nil or room[cs] < low) then low = room[cs] end
    if refused[cs] and n_refused >= tonumber(ARGV[13]) and n_refused * 2 >= n_sent then
      first, told = cs, low
    end
  end
  if first then
    full_at, full_resume = first / 100, math.max((told or 0) / 100, now)
    redis.call('HSET', key, 'full_at', tostring(full_at), 'full_resume', tostring(full_resume))
    if full_resume > paused then
      paused = full_resume
      redis.call('HSET', key, 'paused', tostring(paused))
    end
  end
end
if rate <= 0 and found >= 0 then rate = found elseif rate <= 0 then rate = tonumber(state[1] or '0') end
if rate <= 0 and given <= 0 and given_tokens <= 0 then
  -- No limit given (a token limit bounds the rate too) and none found yet: the account
  -- ramps up as one, from a few starts a second, doubling every quarter second while the
  -- account's requests are let through at half the ramp's rate at least, as the processes
  -- tell their answers (processes still starting send little of it; and what was sent is not
  -- yet let through: a server, or a machine, that falls behind answers late, and its refusals
  -- with it: counted as sent, the ramp ran to 16 times a limit of 1,000 a second before the
  -- first refusal came back, at 16 shards on two cores) and nothing was refused for a second (a server counting by the second refuses only
  -- once its second is full: a quarter without refusals, the ramp ran to 4 and 8 times the
  -- limit), and not before the limit the refusals tell is read: half a second after a pause.
  -- No start is leased while the ramp is paused, nor for a second after (the longest a
  -- reading waits for every process's log), unless the limit is read by then (the ramp
  -- ends): leased at its rate, they went at once when the pause ended, thousands a second,
  -- or at the ramp's rate, four times the limit, till the reading came.
  booting = 1
  rate = tonumber(state[6] or ARGV[9])
  if now - boot_at >= 0.25 then
    if paused + 0.5 < now and now - refused_at >= 1 and boot_ok >= rate * (now - boot_at) / 2 then
      rate = math.min(rate * 2, 100000)
    end
    boot_at, boot_ok = now, 0
  end
  redis.call('HSET', key, 'boot', tostring(rate), 'boot_at', tostring(boot_at), 'boot_ok', tostring(boot_ok))
  if now < paused + 1 then want = 0 end
end
local start, token_start = -1, -1
if want > 0 and rate > 0 then
  -- No more than a tenth of a second of the rate in force: a lease sized at a rate since cut
  -- would book the account's clock seconds ahead.
  want = math.min(want, math.max(1, math.ceil(rate * 0.1)))
  start = math.max(tonumber(state[10] or '0'), now, paused)
  redis.call('HSET', key, 'clock', tostring(start + want / rate))
else
  want = 0
end
if want_tokens > 0 and given_tokens > 0 then
  token_start = math.max(tonumber(state[11] or '0'), now, paused)
  redis.call('HSET', key, 'token_clock', tostring(token_start + want_tokens / given_tokens))
end
-- The processes seen lately; and the time up to which the store holds the whole account's
-- send log: a process has told it up to its last call, and for good while it holds no starts
-- (it cannot send without calling again).
redis.call('HSET', members, pid, tostring(now) .. ((holds or want > 0) and '' or ' idle'))
local seen, reported, all = 0, now + 3600, redis.call('HGETALL', members)
for i = 1, #all, 2 do
  local at = tonumber(string.match(all[i + 1], '^[^ ]+'))
  if now - at < 5 then
    seen = seen + 1
    if at < reported and not string.find(all[i + 1], 'idle', 1, true) then reported = at end
  elseif now - at > 60 then
    redis.call('HDEL', members, all[i])
  end
end
redis.call('EXPIRE', key, ttl)
redis.call('EXPIRE', members, ttl)
return {tostring(now), tostring(rate), tostring(start), tostring(token_start), tostring(paused),
        tostring(seen), leads and '1' or '0', tostring(booting), tostring(full_at), tostring(full_resume),
        tostring(want), tostring(reported)}
"""

# What the account sent in [from, to), in hundredths, and how much of it was refused; and the
# hundredth of the first send (-1: none).
_READ = """
local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
local sent, refused, first = 0, 0, -1
for second = math.floor(from / 100), math.floor((to - 1) / 100) do
  local counts = redis.call('HGETALL', KEYS[1] .. ':log:' .. second)
  for i = 1, #counts, 2 do
    local cs = tonumber(string.sub(counts[i], 2))
    if cs >= from and cs < to then
      local n = tonumber(counts[i + 1])
      local kind = string.sub(counts[i], 1, 1)
      if kind == 's' then
        sent = sent + n
        if first < 0 or cs < first then first = cs end
      elseif kind == 'r' then
        refused = refused + n
      end
    end
  end
end
return {sent, refused, first}
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
    leads: bool  # the rate in force is this process's reading
    booting: bool  # no limit given or found: the rate is the ramp's
    full_at: float  # the account's last run of refusals began with a request sent then (-1: none)
    full_resume: float  # and the server said it had room again then
    granted: int  # starts leased (no more than a tenth of a second of the rate)
    # The store holds every process's send log up to then (a process that holds no starts has
    # told all it sent): a reading up to then is whole.
    reported: float = math.inf


class AccountStore(Protocol):
    """Where the account's shared pace is kept: Redis (`Store`), or a Ray actor
    (`pipeline.pace.actor.ActorStore`). A `SharedPacer` opens one for its run."""

    async def check(self) -> None: ...

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
        log: str = "",
        holds: bool = False,
        answered: int = 0,
    ) -> Reply: ...

    async def read(self, since: float, until: float) -> tuple[int, int, float | None]: ...

    async def close(self) -> None: ...


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
        self._read = self._client.register_script(_READ)

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
        log: str = "",
        holds: bool = False,
        answered: int = 0,
    ) -> Reply:
        """Lease `want` starts and `want_tokens` tokens (either may be 0), publish a rate
        found and a pause, and add `log` ("hundredth sent refused room" quads) to the send log;
        `holds`: the process still holds leased starts (it may send without calling);
        `answered`: its requests let through since its last call (the ramp grows on them)."""
        from redis.exceptions import RedisError

        keys = [self.account, f"{self.account}:members"]
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
            raw = await self._script(
                keys=keys, args=[*args, KEY_TTL, BOOT_RATE, log, LOG_TTL, WATCH, RUN, int(holds), answered]
            )
        except (RedisError, OSError) as e:
            raise StoreAway(type(e).__name__) from None
        (
            now,
            rate,
            start,
            token_start,
            paused,
            members,
            leads,
            booting,
            full_at,
            full_resume,
            granted,
            reported,
        ) = (float(x) for x in raw)
        return Reply(
            now,
            rate,
            start,
            token_start,
            paused,
            int(members),
            bool(leads),
            bool(booting),
            full_at,
            full_resume,
            int(granted),
            reported,
        )

    async def read(self, since: float, until: float) -> tuple[int, int, float | None]:
        """What the account sent from `since` to `until` (the store's clock): how many, how
        many of them were refused, and when the first of them left (None: none did)."""
        from redis.exceptions import RedisError

        try:
            raw = await self._read(keys=[self.account], args=[int(since * 100), int(until * 100)])
        except (RedisError, OSError) as e:
            raise StoreAway(type(e).__name__) from None
        sent, refused, first = (int(x) for x in raw)
        return sent, refused, (first / 100 if first >= 0 else None)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.aclose()
