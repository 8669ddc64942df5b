-- report: count one probe's outcome, if its lease is still held in this generation.
-- KEYS: 1 state, 2 probes
-- ARGV: 1 generation, 2 lease id, 3 failed (0|1), 4 slow (0|1)
-- Returns: {'counted', 0|1, 'done', probes done, 'failed', n, 'slow', n, 'current', 0|1}
-- While the breaker is still half-open at that generation, the probes' counts come back
-- even when this report was not counted (sent again after its reply was lost, its lease
-- gone): the verdict can always be worked out again, and a verdict pushed twice is harmless
-- (compare-and-set by generation). A state key of another type is left alone: not counted.
-- (Starts with prelude.lua: int, MAX_INT.)
local nothing = {'counted', 0, 'done', 0, 'failed', 0, 'slow', 0, 'current', 0}
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return nothing end
local v = redis.call('HMGET', KEYS[1], 'state', 'gen', 'pd', 'pf', 'ps')
if v[1] ~= 'half_open' or tonumber(v[2]) ~= tonumber(ARGV[1]) then return nothing end
local done = int(v[3], 0, MAX_INT) or 0
local failed = int(v[4], 0, MAX_INT) or 0
local slow = int(v[5], 0, MAX_INT) or 0
local counted = 0
if redis.call('TYPE', KEYS[2])['ok'] == 'zset' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  done, failed, slow = done + 1, failed + tonumber(ARGV[3]), slow + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'pd', done, 'pf', failed, 'ps', slow)
  counted = 1
end
return {'counted', counted, 'done', done, 'failed', failed, 'slow', slow, 'current', 1}
