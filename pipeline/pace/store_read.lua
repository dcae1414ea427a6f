-- What the account sent in hundredths [ARGV[1], ARGV[2]), how much of it was refused, and the
-- hundredth of its first send (-1: none).
local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
local sent, refused, first = 0, 0, -1
for second = math.floor(from / 100), math.floor((to - 1) / 100) do
  local counts = redis.call('HGETALL', KEYS[1] .. ':log:' .. second)
  for i = 1, #counts, 2 do
    local cs = tonumber(string.sub(counts[i], 2))
    if cs >= from and cs < to then
      local n, kind = tonumber(counts[i + 1]), string.sub(counts[i], 1, 1)
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
