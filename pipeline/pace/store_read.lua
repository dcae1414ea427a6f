-- From hundredth ARGV[1] to ARGV[2] (not in): what the account sent, how much of it was
-- refused, and what the server admitted.
local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = {s = 0, r = 0, w = 0, a = 0}
for second = math.floor(from / 100), math.floor((to - 1) / 100) do
  local counts = redis.call('HGETALL', KEYS[1] .. ':log:' .. second)
  for i = 1, #counts, 2 do
    local cs, kind = tonumber(string.sub(counts[i], 2)), string.sub(counts[i], 1, 1)
    if cs >= from and cs < to then n[kind] = n[kind] + tonumber(counts[i + 1]) end
  end
end
return {n.s, n.r, n.a}
