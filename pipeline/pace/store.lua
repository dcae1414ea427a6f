-- The account's shared pace: one call a lease or sync, atomic, on the store's clock (TIME).
-- KEYS: the account, its members. ARGV: the `Ask`'s fields in order (pid, want, want_tokens,
-- given, given_tokens, found (-1: none), pause_for, log, holds, answered, whole), then KEY_TTL,
-- BOOT_RATE, LOG_TTL, WATCH, RUN, GROW, SIT, SHARE. Nothing here scans more than the call brings but a run of
-- refusals, looked for only when the call tells of one: a call costs a few commands.
local key, members = KEYS[1], KEYS[2]
local pid = ARGV[1]
local want, want_tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local given, given_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local found, pause_for = tonumber(ARGV[6]), tonumber(ARGV[7])
local holds, answered, whole = ARGV[9] == '1', tonumber(ARGV[10]), tonumber(ARGV[11])
local ttl, boot_rate, log_ttl, watch, run = ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
local grow, sit, share = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cs_now = math.floor(now * 100)
local state = redis.call('HMGET', key, 'found', 'found_by', 'paused', 'full_at', 'full_resume', 'boot', 'boot_at',
                         'boot_ok', 'refused_at', 'clock', 'token_clock', 'refusing', 'boot_got')
local paused = tonumber(state[3] or '0')
local full_at, full_resume = tonumber(state[4] or '-1'), tonumber(state[5] or '-1')
local boot_at = tonumber(state[7] or tostring(now))
local boot_ok, refused_at = tonumber(state[8] or '0') + answered, tonumber(state[9] or '0')
local refusing = tonumber(state[12] or '0')  -- refusals told since then, never SIT apart
-- The send log: "hundredth sent refused room admitted" fives, under a key a second (room: the
-- earliest time, in hundredths, a refusal of a request sent then said the server has room
-- again; admitted: let through then, as their answers tell). A run
-- of refusals is looked for (below) from `from` on, past the last one seen: a call telling only
-- refusals before it (of that run, told late) cannot show a new one, and looks for none.
local from = math.max(cs_now - math.floor(watch * 100), math.ceil(full_resume * 100))
local told_refusal, told_new, written = false, false, {}
for cs, sent, refused, room, admitted in string.gmatch(ARGV[8], '(%d+) (%d+) (%d+) (%d+) (%d+)') do
  local log = key .. ':log:' .. math.floor(tonumber(cs) / 100)
  written[log] = true
  if sent ~= '0' then redis.call('HINCRBY', log, 's' .. cs, sent) end
  if admitted ~= '0' then redis.call('HINCRBY', log, 'a' .. cs, admitted) end
  if refused ~= '0' then
    redis.call('HINCRBY', log, 'r' .. cs, refused)
    told_refusal, told_new = true, told_new or tonumber(cs) >= from
  end
  if room ~= '0' then
    local was = tonumber(redis.call('HGET', log, 'w' .. cs) or room)
    redis.call('HSET', log, 'w' .. cs, math.min(was, tonumber(room)))
  end
end
if told_refusal then
  if now - refused_at >= sit then refusing = now end
  refused_at = now
  redis.call('HSET', key, 'refused_at', tostring(now), 'refusing', tostring(refusing))
end
for log, _ in pairs(written) do redis.call('EXPIRE', log, log_ttl) end
if found >= 0 and given <= 0 and given_tokens <= 0 and tonumber(state[1] or '0') <= 0 then
  -- The ramp ends: its leases too (each process drops those it holds when told), and the clock
  -- they booked goes from now (the found pace's first starts waited 0.3 s at 40 a second).
  state[10] = tostring(now)
  redis.call('HSET', key, 'clock', state[10])
end
if found >= 0 then redis.call('HSET', key, 'found', tostring(found), 'found_by', pid) end
local leads = found >= 0 or (state[2] or pid) == pid
local rate, booting = given, 0
if pause_for > 0 and now + pause_for > paused then
  paused = now + pause_for
  redis.call('HSET', key, 'paused', tostring(paused))
end
if given <= 0 and told_new then
  -- Full: most of what the account sent since its first refusal of the last `watch` seconds
  -- was refused. Each process sees only its share of such a run (sixteen would each take
  -- sixteen times as long): the account pauses till the earliest time a refusal of the run
  -- said the server has room again (a scattered refusal among them may ask for longer).
  local sent, refused, room, admitted = {}, {}, {}, {}
  local kinds = {s = sent, r = refused, w = room, a = admitted}
  for second = math.floor(from / 100), math.floor(cs_now / 100) do
    local counts = redis.call('HGETALL', key .. ':log:' .. second)
    for i = 1, #counts, 2 do
      local cs = tonumber(string.sub(counts[i], 2))
      if cs >= from then kinds[string.sub(counts[i], 1, 1)][cs] = tonumber(counts[i + 1]) end
    end
  end
  -- Back from the latest hundredth refused: the earliest from which on at least `run`
  -- requests were refused, and half of what was sent (a scattered refusal before the run
  -- does not hold it back, nor do refusals that come back slowly fall out of the window).
  -- What was sent after the latest refused is not yet answered: counted, a run was seen two
  -- round trips after it began (0.9 s on two busy cores), the ramp sending into it.
  local hundredths = {}
  for cs, _ in pairs(sent) do hundredths[#hundredths + 1] = cs end
  for cs, _ in pairs(refused) do if not sent[cs] then hundredths[#hundredths + 1] = cs end end
  table.sort(hundredths)
  local first, told, n_sent, n_refused, low = nil, nil, 0, 0, nil
  local latest, earliest, s_sent, s_refused = nil, nil, 0, 0
  for i = #hundredths, 1, -1 do
    local cs = hundredths[i]
    if n_refused > 0 or refused[cs] then n_sent, n_refused = n_sent + (sent[cs] or 0), n_refused + (refused[cs] or 0) end
    if room[cs] and (low == nil or room[cs] < low) then low = room[cs] end
    if refused[cs] then
      latest, earliest, s_sent, s_refused = latest or cs, cs, n_sent, n_refused
      if n_refused >= run and n_refused * 2 >= n_sent then first, told = cs, low end
    end
  end
  -- Or refused for a second or more, twice `run` (a share of a few is chance) and a `share` (a
  -- quarter) of what was sent since: full at the latest, the limit read from the second before
  -- (the bucket's savings spent by then). A bucket refilled continuously refuses scattered
  -- among what it lets through, never a run: at 250 a second with 2 s answers the ramp sat at
  -- 408, 39 % refused, under the 3/4 let through it grows on; no limit read, 1,500 refusals in
  -- 20 s. Growing while 3/4 get through, seen full at a quarter refused: no rate sits.
  if not first and earliest and latest - earliest >= 100 and s_refused >= 2 * run and s_refused * share >= s_sent then
    first, told = latest, room[latest]
  end
  if first then
    -- The room told is when the server had room, though the run is seen later: what was
    -- let through is read from then on. The pause (and the ramp's hold) runs from now at least.
    full_at, full_resume = first / 100, told and told / 100 or now
    redis.call('HSET', key, 'full_at', tostring(full_at), 'full_resume', tostring(full_resume))
    if math.max(full_resume, now) > paused then
      paused = math.max(full_resume, now)
      redis.call('HSET', key, 'paused', tostring(paused))
    end
    if given_tokens <= 0 and (found >= 0 and found or tonumber(state[1] or '0')) <= 0 then
      -- The ramp goes on from what got through in the second before (as the first reading
      -- counts it, as told so far), not from its rate: at 16 shards it was two to eight times
      -- the limit when the run was seen, and went on at it after the pause while no reading
      -- was in (a second wave of refusals). At least a quarter of the ramp's first rate (16 a
      -- second, where it began before GROW): from 64, a limit under it would be run past again.
      -- None told admitted (answers of seconds: the ramp went on from 16 till a reading came):
      -- what was sent then before the first refused and not refused. Not else: a request
      -- logged sent and not yet arrived (busy cores) may yet be refused.
      local last = (told and told > first and told < first + 100) and told or first
      local got, stop = 0, last > first and last or first + 1
      for cs, n in pairs(admitted) do if cs >= last - 100 and cs < stop then got = got + n end end
      local told_got = got > 0
      if not told_got then
        for cs, n in pairs(sent) do if cs >= last - 100 and cs < first then got = got + n end end
        for cs, n in pairs(refused) do if cs >= last - 100 and cs < first then got = got - n end end
      end
      state[6] = tostring(math.max(tonumber(boot_rate) / 4, math.min(tonumber(state[6] or boot_rate), got)))
      -- Held after the pause (below) unless told admitted: sent and not refused counts refusals
      -- not told yet as let through (busy cores), and leased at once ran past the limit again.
      refusing, state[13] = now, told_got and '1' or '0'
      redis.call('HSET', key, 'boot', state[6], 'boot_got', state[13], 'refusing', tostring(now))
    end
  end
end
if rate <= 0 and found >= 0 then rate = found elseif rate <= 0 then rate = tonumber(state[1] or '0') end
if rate <= 0 and given <= 0 and given_tokens <= 0 then
  -- No limit given (a token limit bounds the rate too) nor found: the account ramps up as one,
  -- from 64 a second, by `grow` (doubling every 3/8 s; whole) every quarter second. Against a server
  -- counting by the second, a ramp growing g times a second fills the second at about
  -- ln g / (1 - 1/g) times the limit, and that is refused for a round trip and the telling: at
  -- 16 times a second (doubling every quarter, from 16) 3 times, 6.3 times: 2.2 times, as soon
  -- at 1,000 a second (the model in test_pace_account: 30 to 40 % fewer refusals). It grows while
  -- * its requests are let through (as the processes tell their answers) at 3/4 of the
  --   ramp's rate at least: counted as sent, a server or machine behind (its refusals late
  --   too) let the ramp run to 16 times a limit of 1,000 a second at 16 shards on two cores;
  --   at half, to 4 times (doubled at 2,048 a second with 1,080 let through);
  -- * nothing was refused for a second: a server counting by the second refuses only once its
  --   second is full (a quarter without refusals ran the ramp to 4 and 8 times the limit);
  --   or refusals came for `sit` s without a run (since one, or a gap that long): 102 a second
  --   at 100 was refused two a second, too few for a run, for the whole run (2 % 429s);
  -- * not within a second of a pause, before the limit its refusals tell is read (the hold below
  --   kept it so, sending nothing: a ramp sent from its pause's end grew past the limit first);
  --   two after a run set it to what was told admitted: a reading waits a second and its
  --   answers' latency, later on busy cores (none 3 s on at 1,000 a second: 305 -> 169 refused).
  -- A grown rate goes from now, not the account's clock (ahead by the starts its processes
  -- hold: each step came that late; SHARDS2's model: 3 to 3.7 s to 90 % of 1,000/s, 1 to 1.7).
  -- No start is leased while paused, nor for a second after (the longest a reading waits for
  -- every process's log) unless the ramp ends, or a run set it to what was told admitted (then it
  -- grows only on answers): leased at a rate grown past the limit, they went at once when the
  -- pause ended, thousands a second. Held after a run, the account sent nothing in the
  -- server's next second when the first reading came later (busy cores), filled the one after
  -- and was full again: that moment, read over two seconds, half the limit (60 % for 20 s).
  booting = 1
  rate = tonumber(state[6] or boot_rate)
  if now - boot_at >= 0.25 then
    local quiet = now - refused_at >= 1 or now - refusing >= sit
    if paused + 1 + (state[13] == '1' and 1 or 0) < now and quiet and boot_ok >= rate * (now - boot_at) * 0.75 then
      rate, state[10] = math.min(math.floor(rate * grow + 0.5), 100000), tostring(now)
      redis.call('HSET', key, 'clock', state[10])
    end
    boot_at, boot_ok = now, 0
  end
  redis.call('HSET', key, 'boot', tostring(rate), 'boot_at', tostring(boot_at), 'boot_ok', tostring(boot_ok))
  if now < paused + (state[13] == '1' and 0 or 1) then want = 0 end
end
local start, token_start = -1, -1
if rate <= 0 then want = 0 end
if given_tokens <= 0 then want_tokens = 0 end
-- Starts and tokens asked together are leased from one instant, the later of the two clocks:
-- leased apart, a process's starts and its tokens fell due at different times, each gone late
-- while it waited for the other, and the account sent half its limit when both bound.
local base = math.max(now, paused)
if want > 0 then base = math.max(base, tonumber(state[10] or '0')) end
if want_tokens > 0 then base = math.max(base, tonumber(state[11] or '0')) end
if want > 0 then
  -- A tenth of a second of the rate at most: a lease sized at a rate since cut would book the
  -- account's clock seconds ahead.
  want = math.min(want, math.max(1, math.ceil(rate * 0.1)))
  start = base
  redis.call('HSET', key, 'clock', tostring(start + want / rate))
end
if want_tokens > 0 then
  token_start = base
  redis.call('HSET', key, 'token_clock', tostring(token_start + want_tokens / given_tokens))
end
-- The processes seen lately; and up to when the store holds the account's log whole: a process
-- told its log up to its last call (all of it while it holds no starts and no request is out: it
-- cannot send without calling), its admissions up to where it said they are whole.
local told = math.min((holds or want > 0) and now or now + 3600, whole >= 0 and whole or math.huge)
redis.call('HSET', members, pid, tostring(now) .. ' ' .. tostring(told))
local seen, reported, all = 0, now + 3600, redis.call('HGETALL', members)
-- Whose reading is in force leads (probes upward, for all); any process, once it has not been
-- seen for 5 s (its shard done): else nobody probed again, and a limit that rose was never used.
local gone = true
for i = 1, #all, 2 do
  local at, upto = string.match(all[i + 1], '(%S+) ?(%S*)')
  at = tonumber(at)
  if now - at < 5 then
    seen, reported = seen + 1, math.min(reported, tonumber(upto) or at)
    if all[i] == state[2] then gone = false end
  elseif now - at > 60 then
    redis.call('HDEL', members, all[i])
  end
end
redis.call('EXPIRE', key, ttl)
redis.call('EXPIRE', members, ttl)
return {tostring(now), tostring(rate), tostring(start), tostring(token_start), tostring(paused),
        tostring(seen), (leads or gone) and '1' or '0', tostring(booting), tostring(full_at), tostring(full_resume),
        tostring(want), tostring(reported)}
