-- probe: take a half-open probe lease, fleet-wide (moving OPEN to HALF_OPEN when it is time,
-- published like any transition).
-- KEYS: 1 state, 2 window, 3 probes (zset: lease id -> expiry in ms)
-- ARGV: 1 caller's generation (its floor: see load), 2 probes allowed, 3 lease in ms, 4 lease id,
--       5 now in ms ("" = TIME), 6 ttl in ms, 7 channel, 8 breaker name
-- Returns: fleet(...) + {'granted', 0|1, 'wait', ms until a lease frees,
--          'done', 'failed', 'slow': the probes' counts while half-open}
-- A half-open breaker whose probes have all reported but whose verdict never arrived (its
-- reporter died, or the reply was lost) grants nothing: the caller works out the verdict
-- from the counts and pushes it (compare-and-set by generation).
-- While half-open, expired leases are purged first, so a holder that died cannot wedge the
-- breaker; so are leases expiring implausibly late (a score written by someone else).
-- (Starts with prelude.lua: now_ms, int, load, publish, fleet, append, MAX_INT.)
local now = now_ms(ARGV[5])
local state, gen, open_until, reopens, reset = load(KEYS, ARGV[1], now)
if state == 'open' and now >= open_until then
  gen = gen + 1
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'pd', 0, 'pf', 0, 'ps', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
  publish(ARGV[7], ARGV[8], state, gen, open_until, reopens, now)
end
local granted, wait, done, failed, slow = 0, 0, 0, 0, 0
if state == 'half_open' then
  local lease = tonumber(ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '(' .. (now + 2 * lease), '+inf')
  local held = redis.call('ZCARD', KEYS[3])
  local counts = redis.call('HMGET', KEYS[1], 'pd', 'pf', 'ps')
  done = int(counts[1], 0, MAX_INT) or 0
  failed = int(counts[2], 0, MAX_INT) or 0
  slow = int(counts[3], 0, MAX_INT) or 0
  if held + done < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
    granted = 1
  else
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if first[2] then wait = tonumber(first[2]) - now end
  end
end
return append(fleet(state, gen, open_until, reopens, now, reset), 'granted', granted,
  'wait', wait, 'done', done, 'failed', failed, 'slow', slow)
