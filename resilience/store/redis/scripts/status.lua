-- status: everything known about some policy names, for status tools. Read-only.
-- KEYS: 11 per name (state, window, probes, replicas, leases, gcra, budget, limit, shares,
--       counts, cache:result),
--       each "<prefix>:{<escaped name>}:<suffix>"; or none, and the names in ARGV (one Redis
--       only: not for a Cluster)
-- ARGV: 1 now in ms ("" = server TIME); without KEYS also 2 prefix, 3 the names (escaped)
--       joined by tabs, 4 a "1" or "0" per name: whether to look for a bulkhead, rate limiter
--       and budget too (with KEYS, every name is looked for as all of them)
-- Returns: {now, header, entry, entry, ...}. The header names the columns, joined by tabs:
--   breaker: s state, g gen, u open_until, c calls, f failures, l slow (the
--   window's running totals, or the probes' while half-open), p probe leases held, o the
--   "calls,failures,slow" that opened it; bulkhead: n permits held (leases, and permits in use
--   under shares), m its limit, a the sum of the holders' own (adaptive) limits; rate
--   limiter: q its arrival time; budget: t tokens; shared window (a throttle's, a hedge's):
--   w its two figures' totals over the buckets kept, "<first>,<second>"; a health check
--   (a name under "health:"): h its runner's last published result, as published (JSON).
--   An entry per name: its columns in the header's order joined by tabs (a column is empty
--   when the name has no such policy), then one "<replica id>|<its report>" per replica.
--   Compact: a status of 10,000 names is 10,000 strings.
-- O(1) per name for a count window, O(buckets) for a time window. A key of the wrong type
-- reads as absent (pcall), so one damaged name cannot fail the others.
-- (Starts with prelude.lua: now_ms, int, MAX_INT.)
local now = now_ms(ARGV[1])
local function get(...)
  local ok = redis.pcall(...)
  if type(ok) == 'table' and ok.err then return nil end
  return ok
end

-- the time window's totals over its live buckets
local function window(win, buckets, width)
  local calls, failures, slow = 0, 0, 0
  local epoch = math.floor(now / (tonumber(width) or 1))
  local all = get('HGETALL', win) or {}
  for i = 1, #all, 2 do
    local tag, b, value = string.sub(all[i], 1, 1), tonumber(string.sub(all[i], 2)),
      int(all[i + 1], 0, MAX_INT)
    if b and value and b > epoch - (tonumber(buckets) or 1) then
      if tag == 'c' then calls = calls + value
      elseif tag == 'f' then failures = failures + value
      elseif tag == 's' then slow = slow + value end
    end
  end
  return calls, failures, slow
end

-- the breaker's 8 columns s..o, and its replicas' reports ('' and none: no breaker)
local function breaker(base)
  local state_key = base .. 'state'
  local v = get('HMGET', state_key, 'state', 'gen', 'open_until', 'wk', 'tc', 'tf', 'ts')
  if not (v and v[1]) then return '\t\t\t\t\t\t\t', '' end
  local state, calls, failures, slow, probes, opened = v[1], 0, 0, 0, 0, '0,0,0'
  if state == 'half_open' then
    local p = get('HMGET', state_key, 'pd', 'pf', 'ps') or {}
    calls, failures, slow = p[1] or 0, p[2] or 0, p[3] or 0
    probes = get('ZCOUNT', base .. 'probes', '(' .. now, '+inf') or 0
  elseif v[4] == 'c' then
    calls, failures, slow = v[5] or 0, v[6] or 0, v[7] or 0
  elseif v[4] == 't' then
    local w = get('HMGET', state_key, 'ws', 'ww') or {}
    calls, failures, slow = window(base .. 'win', w[1], w[2])
  end
  if state == 'open' then
    local o = get('HMGET', state_key, 'oc', 'of', 'os') or {}
    opened = (o[1] or 0) .. ',' .. (o[2] or 0) .. ',' .. (o[3] or 0)
  end
  local reports = get('HGETALL', base .. 'replicas') or {}
  local r = ''
  if #reports == 2 then -- the usual case: one replica
    r = '\t' .. reports[1] .. '|' .. reports[2]
  elseif #reports > 2 then
    local all = {}
    for i = 1, #reports, 2 do all[#all + 1] = '\t' .. reports[i] .. '|' .. reports[i + 1] end
    r = table.concat(all)
  end
  return state .. '\t' .. (v[2] or '') .. '\t' .. (v[3] or '') .. '\t' .. calls .. '\t' ..
    failures .. '\t' .. slow .. '\t' .. probes .. '\t' .. opened, r
end

-- the permits in use under a fleet-wide limit's shares, and the sum of the holders' own
-- (adaptive) limits, as the holders last reported
local function shared(key)
  local held, own = 0, 0
  for _, v in ipairs(get('HVALS', key) or {}) do
    local h, e, o = string.match(v, '^%d+ (%d+) (%d+) ?(%d*)$')
    if h and tonumber(e) > now then
      held = held + tonumber(h)
      own = own + (tonumber(o) or 0)
    end
  end
  return held, own
end

-- a shared window's two totals over the buckets it keeps (window.lua deletes the old ones
-- at each exchange), '' when there is none; fields that are not ours are skipped
local function counts(key)
  local all = get('HGETALL', key)
  if not all or #all == 0 then return '' end
  local totals = {0, 0}
  for i = 1, #all, 2 do
    local figure = tonumber(string.match(all[i], '^%-?%d+%.(%d+)$'))
    local v = count(all[i + 1])
    if v and totals[figure] then totals[figure] = math.min(totals[figure] + v, MAX_INT) end
  end
  return totals[1] .. ',' .. totals[2]
end

-- the columns n..h: fleet-wide leases (per call, and shares), rate limiter, budget, window,
-- health check's result
local function others(base)
  local leases, shares, gcra, budget, shared_window = base .. 'leases', base .. 'shares',
    base .. 'gcra', base .. 'budget', base .. 'counts'
  local result = ''
  if string.find(base, ':{health%3A', 1, true) then -- a health check: its published result
    result = get('GET', base .. 'cache:result') or ''
  end
  if redis.call('EXISTS', leases, shares, gcra, budget, shared_window) == 0 then
    return '\t\t\t\t\t\t' .. result
  end
  local held, limit, own = '', '', ''
  if redis.call('EXISTS', leases, shares) > 0 then
    local in_shares, adaptive = shared(shares)
    held = (get('ZCOUNT', leases, '(' .. now, '+inf') or 0) + in_shares
    limit = get('GET', base .. 'limit') or ''
    if adaptive > 0 then own = adaptive end
  end
  return held .. '\t' .. limit .. '\t' .. own .. '\t' .. (get('GET', gcra) or '') .. '\t' ..
    (get('GET', budget) or '') .. '\t' .. counts(shared_window) .. '\t' .. result
end

-- each name's keys share a base, "<prefix>:{<escaped name>}:" (KEYS[1] is the first's state)
local bases = {}
if #KEYS > 0 then
  for n = 1, #KEYS, 11 do bases[#bases + 1] = string.sub(KEYS[n], 1, -6) end
else
  local head = ARGV[2] .. ':{'
  for name in string.gmatch(ARGV[3] or '', '[^\t]+') do
    bases[#bases + 1] = head .. name .. '}:'
  end
end
local marks = ARGV[4] or ''
local out = {now, 's\tg\tu\tc\tf\tl\tp\to\tn\tm\ta\tq\tt\tw\th'}
for n = 1, #bases do
  local columns, reports = breaker(bases[n])
  local more = '\t\t\t\t\t\t'
  if string.byte(marks, n) ~= 48 then more = others(bases[n]) end -- '0': a breaker only
  out[n + 2] = columns .. '\t' .. more .. reports
end
return out
