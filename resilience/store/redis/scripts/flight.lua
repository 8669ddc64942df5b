-- flight: one replica runs a call as the holder of the flight's lease; the others wait for
-- what it publishes (Coalesce across a fleet).
-- KEYS: 1 the flight's lease (a string "<holder> <expiry in ms>"), 2 what its holder published
--       (a string "<holder> <expiry in ms>\n<value>")
-- ARGV: 1 op ("join", "renew", "land", "give"), 2 now in ms ("" = TIME), 3 holder, 4 ttl in
--       ms, 5 join: the holder awaited ("" = none); land: the value; 6 the store's channel,
--       where land and give publish "flight <KEYS[1]>" (waiters wake up and look)
-- Returns: join -> {holder, value}: value is what the awaited holder published, if it did;
--            else value is false and holder is the lease's holder: another one, or ARGV[3]
--            when the lease was free (or expired), now ARGV[3]'s for ttl;
--          renew -> 1 if ARGV[3] holds the lease (now expiring ttl from now), else 0;
--          land -> 1 if ARGV[3] held the lease: the value is published for ttl and the lease
--            freed, atomically; else 0: nothing written (a holder that lost its lease, say
--            frozen past its expiry, cannot publish);
--          give -> 1 if ARGV[3] held the lease, now freed (nothing published), else 0.
-- What we never write there (another type, a lease that does not parse or expires
-- implausibly late) is deleted.
local n = tonumber(ARGV[2])
if n then
  n = math.floor(n) -- whole milliseconds: expiries are written as digits
else
  local t = redis.call('TIME')
  n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local holder, ttl, op = ARGV[3], tonumber(ARGV[4]), ARGV[1]
local current = nil
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local who, expiry = string.match(redis.call('GET', KEYS[1]), '^(%S+) (%d+)$')
  expiry = tonumber(expiry)
  if who and expiry > n and expiry <= n + 10000000000 then
    current = who
  else
    redis.call('DEL', KEYS[1])
  end
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[1])
end
if op ~= 'join' then
  if current ~= holder then return 0 end
  if op == 'renew' then
    redis.call('SET', KEYS[1], holder .. ' ' .. (n + ttl), 'PX', ttl)
    return 1
  end
  redis.call('DEL', KEYS[1])
  if op == 'land' then
    redis.call('SET', KEYS[2], holder .. ' ' .. (n + ttl) .. '\n' .. ARGV[5], 'PX', ttl)
  end
  redis.call('PUBLISH', ARGV[6], 'flight ' .. KEYS[1])
  return 1
end
local awaited = ARGV[5]
if awaited ~= '' then
  local found = redis.call('TYPE', KEYS[2])['ok']
  if found == 'string' then
    local raw = redis.call('GET', KEYS[2])
    local who, expiry, at = string.match(raw, '^(%S+) (%d+)\n()')
    if who == awaited and tonumber(expiry) > n then return {awaited, string.sub(raw, at)} end
  elseif found ~= 'none' then
    redis.call('DEL', KEYS[2])
  end
end
if current then return {current, false} end
redis.call('SET', KEYS[1], holder .. ' ' .. (n + ttl), 'PX', ttl)
return {holder, false}
