-- health: whether this Redis accepts our scripts and writes (a replica answers READONLY, a
-- full one OOM, an ACL without EVALSHA NOPERM: each keeps the store degraded).
-- KEYS: 1 the health key
-- ARGV: 1 replica id
-- Returns: 1
redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)
return 1
