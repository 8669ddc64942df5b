-- share: one holder's share of a fleet-wide limit (quota leasing: a holder admits calls
-- against its share without asking Redis, and asks again only to grow, shrink or renew it).
-- KEYS: 1 the shares (hash: holder -> "<share> <held> <expiry ms> <own limit>"), 2 the limit
--       (string, for status tools)
-- ARGV: 1 now in ms ("" = server TIME), 2 holder id, 3 share wanted, 4 permits in use now,
--       5 limit, 6 ttl in ms, 7 the holder's own limit now (an adaptive one; 0: none)
-- Returns: {granted share, permits in use fleet-wide (as last reported), now}
-- The live shares never sum above the limit: a holder gets at most what the others leave.
-- Expired entries, and entries that are not ours, are deleted.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local me, want, held = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local others, in_use = 0, held
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local s, h, e = string.match(all[i + 1], '^(%d+) (%d+) (%d+)')
  s, h, e = tonumber(s), tonumber(h), tonumber(e)
  if not (s and h and e) or e <= now or e > now + 10000000000 then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= me then
    others, in_use = others + s, in_use + h
  end
end
local grant = math.max(0, math.min(want, limit - others))
if grant == 0 and held == 0 then
  redis.call('HDEL', KEYS[1], me)
else
  local own = math.max(0, math.floor(tonumber(ARGV[7]) or 0))
  redis.call('HSET', KEYS[1], me, grant .. ' ' .. held .. ' ' .. (now + ttl) .. ' ' .. own)
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
redis.call('SET', KEYS[2], limit, 'PX', ttl)
return {grant, in_use, now}
