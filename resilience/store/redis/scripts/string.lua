-- string: read a string value (a fallback's cached value, or what a lease's holder published
-- with lease.lua "publish"), or remove one its reader could not parse.
-- KEYS: 1 the key of the value
-- ARGV: 1 op:
--   "get"  2 the longest value written, in bytes
--          -> {reset, value}: value nil when there is none; reset 1 when the key held
--             something never written there (another type, or a string longer than that),
--             now deleted
--   "drop" 2 a value the reader could not parse
--          -> 1 if the key still held exactly that value (now deleted), else 0 (rewritten
--             since: nothing to reset)
local op = ARGV[1]
if op == 'drop' then
  if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {0, false} end
if kind ~= 'string' or redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return {1, false}
end
return {0, redis.call('GET', KEYS[1])}
