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
local n = tonumber(ARGV[2])
if not n then
  local t = redis.call('TIME')
  n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
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
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (n + 10000000000), '+inf')
local held = redis.call('ZCARD', KEYS[1])
if op == 'count' then return held end
if held >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], n + tonumber(ARGV[5]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
if KEYS[2] then redis.call('SET', KEYS[2], ARGV[4], 'PX', tonumber(ARGV[5])) end
return 1
