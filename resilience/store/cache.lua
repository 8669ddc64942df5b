-- cache: read a fallback's last good value.
-- KEYS: 1 the value (a string)
-- Returns: {reset, value}: value is nil when there is none; a key of another type is deleted
-- (reset = 1, reported as StoreDataReset), never an error reply.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return {0, redis.call('GET', KEYS[1])} end
if kind == 'none' then return {0, false} end
redis.call('DEL', KEYS[1])
return {1, false}
