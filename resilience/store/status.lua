-- status: everything known about one policy name, for status tools. Read-only.
-- KEYS: 1 state, 2 window, 3 probes, 4 replicas, 5 leases, 6 gcra, 7 budget
-- ARGV: 1 now in ms ("" = server TIME)
-- Returns: {now, has breaker (0|1), state, gen, open_until, reopens, calls, failures, slow,
--           probes held, leases held (-1: none), gcra tat ("" none), budget ("" none),
--           "calls failures slow" that opened it, replica id, "last seen ms calls ...", ...}
local now = now_ms(ARGV[1])
local function kind(k) return redis.call('TYPE', k)['ok'] end
local out = {now, 0, '', 0, 0, 0, 0, 0, 0, 0, -1, '', '', ''}
if kind(KEYS[1]) == 'hash' then
  local v = redis.call('HMGET', KEYS[1], 'state', 'gen', 'open_until', 'reopens', 'wk', 'ws', 'ww',
    'oc', 'of', 'os')
  if STATES[v[1]] and tonumber(v[2]) then
    out[2], out[3], out[4] = 1, v[1], tonumber(v[2])
    out[5], out[6] = tonumber(v[3]) or 0, tonumber(v[4]) or 0
    local calls, failures, slow = 0, 0, 0
    local wkind = kind(KEYS[2])
    if v[5] == 'c' and wkind == 'list' then
      for _, chunk in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        local c, f, s = string.match(chunk, '^(%d+) (%d+) (%d+)$')
        if c then calls, failures, slow = calls + c, failures + f, slow + s end
      end
    elseif v[5] == 't' and wkind == 'hash' then
      local buckets, width = tonumber(v[6]) or 1, tonumber(v[7]) or 1
      local epoch = math.floor(now / width)
      local all = redis.call('HGETALL', KEYS[2])
      for i = 1, #all, 2 do
        local tag, e, value = string.sub(all[i], 1, 1), tonumber(string.sub(all[i], 2)),
          tonumber(all[i + 1])
        if e and value and e > epoch - buckets then
          if tag == 'c' then calls = calls + value
          elseif tag == 'f' then failures = failures + value
          elseif tag == 's' then slow = slow + value end
        end
      end
    end
    out[7], out[8], out[9] = calls, failures, slow
    out[14] = (tonumber(v[8]) or 0) .. ' ' .. (tonumber(v[9]) or 0) .. ' ' .. (tonumber(v[10]) or 0)
    if kind(KEYS[3]) == 'zset' then out[10] = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') end
  end
end
if kind(KEYS[5]) == 'zset' then out[11] = redis.call('ZCOUNT', KEYS[5], '(' .. now, '+inf') end
if kind(KEYS[6]) == 'string' then out[12] = redis.call('GET', KEYS[6]) end
if kind(KEYS[7]) == 'string' then out[13] = redis.call('GET', KEYS[7]) end
if kind(KEYS[4]) == 'hash' then
  for _, v in ipairs(redis.call('HGETALL', KEYS[4])) do out[#out + 1] = v end
end
return out
