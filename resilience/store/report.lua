-- report: count one probe's outcome, if its lease is still held in this generation.
-- KEYS: 1 state, 2 probes
-- ARGV: 1 generation, 2 lease id, 3 failed (0|1), 4 slow (0|1)
-- Returns: {counted (0|1), probes done, failed, slow}
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return {0, 0, 0, 0} end
local v = redis.call('HMGET', KEYS[1], 'state', 'gen')
if v[1] ~= 'half_open' or tonumber(v[2]) ~= tonumber(ARGV[1]) then return {0, 0, 0, 0} end
if redis.call('TYPE', KEYS[2])['ok'] ~= 'zset' then return {0, 0, 0, 0} end
if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then return {0, 0, 0, 0} end
local done = redis.call('HINCRBY', KEYS[1], 'pd', 1)
local failed = redis.call('HINCRBY', KEYS[1], 'pf', tonumber(ARGV[3]))
local slow = redis.call('HINCRBY', KEYS[1], 'ps', tonumber(ARGV[4]))
return {1, done, failed, slow}
