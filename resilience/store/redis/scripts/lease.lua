-- lease: take, give back or count expiring permits (a zset: lease id -> expiry in ms), or
-- publish a value as a lease's holder.
-- KEYS: 1 the lease set, 2 the limit last taken with (take: for status tools; optional), or
--       the key to publish under (publish)
-- ARGV: 1 op ("take", "give", "renew", "count", "publish"), 2 now in ms ("" = TIME),
--       3 lease id, 4 limit (publish: the value), 5 ttl in ms (publish: the value's)
-- Returns: take -> 1 if granted else 0; give -> 1 if it was held and unexpired;
--          renew -> 1 if it was held and unexpired (now expiring ttl from now);
--          publish -> 1 if it is held and unexpired (the value written), else 0 (nothing
--          written: a holder that lost its lease, say frozen past its expiry, cannot publish);
--          count -> live leases
-- Expired leases (and leases expiring more than ~115 days ahead: garbage) are purged first;
-- a key of another type is deleted (it holds no lease).
-- (Starts with prelude.lua: server_ms, own, FAR_MS.)
local n = tonumber(ARGV[2]) or server_ms(false) -- a fake clock's time as it is
own(KEYS[1], 'zset')
local op = ARGV[1]
if op == 'renew' or op == 'publish' then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[3]))
  if not expiry or expiry <= n then return 0 end
  if op == 'publish' then
    redis.call('SET', KEYS[2], ARGV[4], 'PX', tonumber(ARGV[5]))
    return 1
  end
  redis.call('ZADD', KEYS[1], 'XX', n + tonumber(ARGV[5]), ARGV[3])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  end
  return 1
end
if op == 'give' then
  local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[3]))
  redis.call('ZREM', KEYS[1], ARGV[3])
  if expiry and expiry > n then return 1 end
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', n)
-- a lease expiring implausibly late (inf, or written by someone else) is garbage
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (n + FAR_MS), '+inf')
local held = redis.call('ZCARD', KEYS[1])
if op == 'count' then return held end
if held >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], n + tonumber(ARGV[5]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
if KEYS[2] then redis.call('SET', KEYS[2], ARGV[4], 'PX', tonumber(ARGV[5])) end
return 1
