-- names: a registry of policy names under a prefix (a set), for status tools.
-- KEYS: 1 the registry
-- ARGV: 1 op: "add" (2 ttl in ms, 3.. the names: added, and the registry's lifetime set to
--       the ttl) or "read"
-- Returns: add -> {reset}; read -> {reset, name, name, ...}. A key of another type is deleted
-- first (reset = 1, reported as StoreDataReset): bad data costs the registry, never an error
-- reply that would turn the whole store degraded.
local reset = own(KEYS[1], 'set')
if ARGV[1] == 'read' then
  local names = redis.call('SMEMBERS', KEYS[1])
  table.insert(names, 1, reset)
  return names
end
redis.call('SADD', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {reset}
