-- report: count one probe's outcome, if its lease is still held in this generation.
-- KEYS: 1 state, 2 probes
-- ARGV: 1 generation, 2 lease id, 3 failed (0|1), 4 slow (0|1)
-- Returns: {'counted', 0|1, 'done', probes done, 'failed', n, 'slow', n}
local nothing = {'counted', 0, 'done', 0, 'failed', 0, 'slow', 0}
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return nothing end
local v = redis.call('HMGET', KEYS[1], 'state', 'gen')
if v[1] ~= 'half_open' or tonumber(v[2]) ~= tonumber(ARGV[1]) then return nothing end
if redis.call('TYPE', KEYS[2])['ok'] ~= 'zset' then return nothing end
if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then return nothing end
local counts = redis.call('HMGET', KEYS[1], 'pd', 'pf', 'ps')
local done = (int(counts[1], 0, MAX_INT) or 0) + 1
local failed = (int(counts[2], 0, MAX_INT) or 0) + tonumber(ARGV[3])
local slow = (int(counts[3], 0, MAX_INT) or 0) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'pd', done, 'pf', failed, 'ps', slow)
return {'counted', 1, 'done', done, 'failed', failed, 'slow', slow}
