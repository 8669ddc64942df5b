-- status: everything known about some policy names, for status tools. Read-only.
-- KEYS: 7 per name: state, window, probes, replicas, leases, gcra, budget
-- ARGV: 1 now in ms ("" = server TIME)
-- Returns: {now, entry, entry, ...}, an entry per name of named fields: 'breaker' 0|1,
--   'state', 'gen', 'open_until', 'reopens', 'calls', 'failures', 'slow' (the window's
--   running totals, or the probes' while half-open), 'probes' (leases held), 'opened_by'
--   ("calls failures slow"), 'leases' (-1: none), 'gcra' and 'budget' (raw, "" none),
--   'replicas' {id, "last seen ms calls failures slow seq", ...}
-- O(1) per name for a count window, O(buckets) for a time window.
local now = now_ms(ARGV[1])
local function kind(k) return redis.call('TYPE', k)['ok'] end
local out = {now}
for base = 0, #KEYS - 7, 7 do
  local k = {KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4], KEYS[base + 5],
    KEYS[base + 6], KEYS[base + 7]}
  local e = {'breaker', 0, 'state', '', 'gen', 0, 'open_until', 0, 'reopens', 0, 'calls', 0,
    'failures', 0, 'slow', 0, 'probes', 0, 'opened_by', '', 'leases', -1, 'gcra', '',
    'budget', '', 'replicas', {}}
  if kind(k[1]) == 'hash' then
    local v = redis.call('HMGET', k[1], 'state', 'gen', 'open_until', 'reopens', 'wk', 'ws',
      'ww', 'oc', 'of', 'os', 'tc', 'tf', 'ts', 'pd', 'pf', 'ps')
    e[2], e[4], e[6], e[8], e[10] = 1, v[1] or '', v[2] or '', v[3] or '', v[4] or ''
    local calls, failures, slow = 0, 0, 0
    if v[1] == 'half_open' then
      calls, failures, slow = v[14] or 0, v[15] or 0, v[16] or 0
    elseif v[5] == 'c' then
      calls, failures, slow = v[11] or 0, v[12] or 0, v[13] or 0
    elseif v[5] == 't' and kind(k[2]) == 'hash' then
      local buckets, width = tonumber(v[6]) or 1, tonumber(v[7]) or 1
      local epoch = math.floor(now / width)
      local all = redis.call('HGETALL', k[2])
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
    e[12], e[14], e[16] = calls, failures, slow
    e[20] = (v[8] or 0) .. ' ' .. (v[9] or 0) .. ' ' .. (v[10] or 0)
    if kind(k[3]) == 'zset' then e[18] = redis.call('ZCOUNT', k[3], '(' .. now, '+inf') end
  end
  if kind(k[5]) == 'zset' then e[22] = redis.call('ZCOUNT', k[5], '(' .. now, '+inf') end
  if kind(k[6]) == 'string' then e[24] = redis.call('GET', k[6]) end
  if kind(k[7]) == 'string' then e[26] = redis.call('GET', k[7]) end
  if kind(k[4]) == 'hash' then e[28] = redis.call('HGETALL', k[4]) end
  out[#out + 1] = e
end
return out
