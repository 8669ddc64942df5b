-- status: everything known about some policy names, for status tools. Read-only.
-- KEYS: 8 per name (state, window, probes, replicas, leases, gcra, budget, limit); or none,
--       and the names (escaped) in ARGV after the prefix (one Redis only: not for a Cluster)
-- ARGV: 1 now in ms ("" = server TIME), 2 prefix, 3.. escaped names (when no KEYS)
-- Returns: {now, entry, entry, ...}: an entry per name, one string of named fields
--   "name=value" joined by tabs (compact: a status of 10,000 names is 10,000 strings):
--   breaker: b=1, s state, g gen, u open_until, r reopens, c calls, f failures, l slow (the
--   window's running totals, or the probes' while half-open), p probe leases held, o the
--   "calls,failures,slow" that opened it, R=<replica id>|<its report> (one per replica);
--   bulkhead: n leases held, m its limit; rate limiter: q its arrival time; budget: t tokens.
-- O(1) per name for a count window, O(buckets) for a time window. A key of the wrong type
-- reads as absent (pcall), so one damaged name cannot fail the others.
local now = now_ms(ARGV[1])
local function get(...)
  local ok = redis.pcall(...)
  if type(ok) == 'table' and ok.err then return nil end
  return ok
end
local out = {now}
local names = #KEYS / 8
if names == 0 then names = #ARGV - 2 end
for n = 1, names do
  local k
  if #KEYS > 0 then
    local b = (n - 1) * 8
    k = {KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4], KEYS[b + 5], KEYS[b + 6], KEYS[b + 7],
      KEYS[b + 8]}
  else
    local base = ARGV[2] .. ':{' .. ARGV[n + 2] .. '}:'
    k = {base .. 'state', base .. 'win', base .. 'probes', base .. 'replicas', base .. 'leases',
      base .. 'gcra', base .. 'budget', base .. 'limit'}
  end
  local e = {}
  local v = get('HMGET', k[1], 'state', 'gen', 'open_until', 'reopens', 'wk', 'ws', 'ww',
    'oc', 'of', 'os', 'tc', 'tf', 'ts', 'pd', 'pf', 'ps')
  if v and v[1] then
    local calls, failures, slow = 0, 0, 0
    if v[1] == 'half_open' then
      calls, failures, slow = v[14] or 0, v[15] or 0, v[16] or 0
    elseif v[5] == 'c' then
      calls, failures, slow = v[11] or 0, v[12] or 0, v[13] or 0
    elseif v[5] == 't' then
      local buckets, width = tonumber(v[6]) or 1, tonumber(v[7]) or 1
      local epoch = math.floor(now / width)
      local all = get('HGETALL', k[2]) or {}
      for i = 1, #all, 2 do
        local tag, b, value = string.sub(all[i], 1, 1), tonumber(string.sub(all[i], 2)),
          int(all[i + 1], 0, MAX_INT)
        if b and value and b > epoch - buckets then
          if tag == 'c' then calls = calls + value
          elseif tag == 'f' then failures = failures + value
          elseif tag == 's' then slow = slow + value end
        end
      end
    end
    local probes = 0
    if v[1] == 'half_open' then probes = get('ZCOUNT', k[3], '(' .. now, '+inf') or 0 end
    e[1] = 'b=1\ts=' .. v[1] .. '\tg=' .. (v[2] or '') .. '\tu=' .. (v[3] or '') .. '\tr=' ..
      (v[4] or '') .. '\tc=' .. calls .. '\tf=' .. failures .. '\tl=' .. slow .. '\tp=' ..
      probes .. '\to=' .. (v[8] or 0) .. ',' .. (v[9] or 0) .. ',' .. (v[10] or 0)
    local reports = get('HGETALL', k[4]) or {}
    for i = 1, #reports, 2 do e[#e + 1] = 'R=' .. reports[i] .. '|' .. reports[i + 1] end
  end
  if redis.call('EXISTS', k[5], k[6], k[7]) > 0 then -- most names are breakers only
    if redis.call('EXISTS', k[5]) == 1 then
      e[#e + 1] = 'n=' .. (get('ZCOUNT', k[5], '(' .. now, '+inf') or 0)
      local limit = get('GET', k[8])
      if limit then e[#e + 1] = 'm=' .. limit end
    end
    local gcra, budget = get('GET', k[6]), get('GET', k[7])
    if gcra then e[#e + 1] = 'q=' .. gcra end
    if budget then e[#e + 1] = 't=' .. budget end
  end
  out[#out + 1] = table.concat(e, '\t')
end
return out
