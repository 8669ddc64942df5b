-- share: one holder's share of a fleet-wide limit (quota leasing: a holder admits calls
-- against its share without asking Redis, and asks again only to grow, shrink or renew it).
-- KEYS: 1 the shares (hash: holder -> "<share> <held> <expiry ms> <own limit>"; the field ""
--       holds when the holders' reports settle, see below; the field "@" counts the writes,
--       so that it outlives its holders by a ttl, and a replica can tell when the store went
--       back in time), 2 the limit (string, for status)
-- ARGV: 1 now in ms ("" = server TIME), 2 holder id, 3 share wanted, 4 permits in use now,
--       5 limit, 6 ttl in ms, 7 the holder's own limit now (an adaptive one; 0: none),
--       8 cap: a growth stops where the holders' shares reach it (a class allowed less than
--       the limit), 9 the share the holder believes it holds (still valid on its side),
--       10 settle ms, 11 the write count this replica last saw in an answer about this key
--       within a ttl (0: none)
-- Returns: {granted share, permits in use fleet-wide (as last reported), now, what the other
--           holders hold (each counted as the larger of its share and its permits in use),
--           1 if garbage was deleted else 0, the write count now}
-- A holder counts as the larger of its share and its permits in use, at most the limit, so
-- the permits in use never exceed the limit while each holder stays within its share. An
-- entry expiring further ahead than this ttl (+1 s) is garbage (a stray write, or the clock
-- stepped back): it is deleted and reported. When the store has lost track of the holders
-- (garbage found, a holder's valid share is missing, or the write count is below one a
-- replica saw within a ttl: Redis restarted empty or from an old snapshot, failed over to a
-- replica behind, or the clock jumped), no share grows past what its holder says it had
-- for `settle` ms (after a loss the store's own records of it are not believed), so that
-- every live holder has reported its permits again before any grows (settle < ttl).
local now = now_ms(ARGV[1])
local reset = own(KEYS[1], 'hash')
local me, want, held = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local cap, had, settle = tonumber(ARGV[8]), math.min(tonumber(ARGV[9]), limit), tonumber(ARGV[10])
local horizon = now + ttl + 1000
local others, in_use, mine, found, settling = 0, held, 0, false, false
local writes = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local who, v = all[i], all[i + 1]
  if who == '@' then
    local w = tonumber(v)
    if w and w >= 0 and w < 4503599627370496 and w == math.floor(w) then
      writes = w
    else -- not a count of ours: reset (HINCRBY would fail on it)
      redis.call('HDEL', KEYS[1], who)
      reset = 1
    end
  elseif who == '' then
    local until_ms = tonumber(v)
    if until_ms and until_ms > now and until_ms <= horizon then
      settling = true
    else
      redis.call('HDEL', KEYS[1], who)
      if not until_ms or until_ms > now then reset = 1 end
    end
  else
    local s, h, e = string.match(v, '^(%d+) (%d+) (%d+)')
    s, h, e = tonumber(s), tonumber(h), tonumber(e)
    if not (s and h and e) or e > horizon then
      redis.call('HDEL', KEYS[1], who)
      reset = 1
    elseif e <= now then
      redis.call('HDEL', KEYS[1], who)
    elseif who == me then
      mine, found = math.min(s, limit), true
    else
      others = others + math.min(math.max(s, h), limit)
      in_use = in_use + math.min(h, limit)
    end
  end
end
local seen = tonumber(ARGV[11]) or 0
local lost = writes < seen
if lost then -- the store went back in time: its records of this holder are not believed,
  mine = 0   -- and the count goes on from what the replica saw (one loss, one settling)
  writes = seen
  redis.call('HSET', KEYS[1], '@', writes)
end
if (reset == 1 or lost or (had > 0 and not found)) and not settling and settle > 0 then
  settling = true
  redis.call('HSET', KEYS[1], '', now + settle)
end
local keep = math.max(mine, had)
local grant = math.min(want, limit - others)
if cap < limit then grant = math.min(grant, math.max(keep, cap - others)) end
if settling then grant = math.min(grant, keep) end
grant = math.max(0, grant)
if grant == 0 and held == 0 then
  redis.call('HDEL', KEYS[1], me)
else
  local own = math.max(0, math.floor(tonumber(ARGV[7]) or 0))
  redis.call('HSET', KEYS[1], me, grant .. ' ' .. held .. ' ' .. (now + ttl) .. ' ' .. own)
end
writes = redis.call('HINCRBY', KEYS[1], '@', 1)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], math.max(ttl, settle))
end
redis.call('SET', KEYS[2], limit, 'PX', ttl)
return {grant, in_use, now, others, reset, writes}
