-- window: a shared sliding-window counter (the fleet's requests and accepts, say).
-- KEYS: 1 the window (hash: "<bucket>.<figure>" -> count)
-- ARGV: 1 now in ms ("" = server TIME), 2 bucket width in ms, 3 buckets, 4 ttl in ms,
--       5.. one delta per figure (integers >= 0)
-- Returns: the window's totals, one per figure (the current bucket and buckets - 1 before
-- it). Old buckets are deleted; a field that is not ours (or a key of another type) is reset.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local width, buckets, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = math.floor(now / width)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local figures = #ARGV - 4
for i = 1, figures do
  local d = tonumber(ARGV[i + 4])
  if d and d > 0 then redis.call('HINCRBY', KEYS[1], epoch .. '.' .. i, d) end
end
local totals = {}
for i = 1, figures do totals[i] = 0 end
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local b, i = string.match(all[j], '^(%d+)%.(%d+)$')
  b, i = tonumber(b), tonumber(i)
  local v = tonumber(all[j + 1])
  if not (b and i and v) or b <= epoch - buckets or b > epoch then
    redis.call('HDEL', KEYS[1], all[j])
  elseif i <= figures and v >= 0 then
    totals[i] = totals[i] + v
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return totals
