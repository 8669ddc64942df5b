-- window: a shared sliding-window counter (the fleet's requests and accepts, say).
-- KEYS: 1 the window (hash: "<bucket>.<figure>" -> count)
-- ARGV: 1 now in ms ("" = server TIME), 2 bucket width in ms, 3 buckets, 4 ttl in ms,
--       5.. one delta per figure (integers >= 0)
-- Returns: {reset, total, total, ...}: reset is 1 when data that is not ours was found and
-- deleted (a key of another type, a field we do not write, a count that is not a whole number
-- in range: "1.5", "inf", " 2", "1e3"), else 0; then the window's totals, one per figure (the
-- current bucket and buckets - 1 before it). Old buckets are deleted. Every count is checked
-- before anything is added, so bad data costs only itself, never an error reply.
-- (Starts with prelude.lua: now_ms, own, count, MAX_INT.)
local now = now_ms(ARGV[1], true) -- a fake clock's time as it is
local width, buckets, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = math.floor(now / width)
local reset = own(KEYS[1], 'hash')
local figures = #ARGV - 4
local totals, current = {}, {}
for i = 1, figures do totals[i], current[i] = 0, 0 end
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local b, i = string.match(all[j], '^(%-?%d+)%.(%d+)$')
  b, i = tonumber(b), tonumber(i)
  local v = count(all[j + 1])
  if not (b and i and v) then
    redis.call('HDEL', KEYS[1], all[j])
    reset = 1
  elseif b <= epoch - buckets or b > epoch then
    redis.call('HDEL', KEYS[1], all[j])
  elseif i <= figures then
    totals[i] = totals[i] + v
    if b == epoch then current[i] = v end
  end
end
for i = 1, figures do
  local d = tonumber(ARGV[i + 4])
  if d and d > 0 then
    local v = math.min(current[i] + d, MAX_INT)
    redis.call('HSET', KEYS[1], epoch .. '.' .. i, string.format('%d', v))
    totals[i] = totals[i] + v - current[i]
  end
end
local reply = {reset}
for i = 1, figures do reply[i + 1] = math.min(totals[i], MAX_INT) end
redis.call('PEXPIRE', KEYS[1], ttl)
return reply
