-- shared: the small atomic primitives of the fleet-wide policies.
-- KEYS: 1 the policy's key
-- ARGV: 1 op, 2 now in ms ("" = server TIME), then per op:
--   "gcra"   3 emission interval in ms, 4 burst          -> "0" if taken, else ms to wait
--            5 tokens wanted (optional, default 1): takes as many as the bucket allows now,
--            up to that, -> "<taken> <ms to wait>" (wait 0 when any was taken)
--   "budget" 3 delta, 4 maximum, 5 ttl in ms             -> the tokens after the change
-- Values are kept as decimal strings; a value that does not parse, or is out of its range,
-- is reset (reported as "!").
local n = tonumber(ARGV[2])
if not n then
  local t = redis.call('TIME')
  n = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local kind = redis.call('TYPE', KEYS[1])['ok']
local reset = ''
if kind ~= 'string' and kind ~= 'none' then
  redis.call('DEL', KEYS[1])
  reset = '!'
end
local raw = redis.call('GET', KEYS[1])
local value = tonumber(raw)
-- a number out of its range (nan, inf, 1e300, a deadline far ahead) is garbage too
local function sane(v, lo, hi)
  if v and v == v and v >= lo and v <= hi then return v end
  if raw then reset = '!' end
  return nil
end
local op = ARGV[1]
if op == 'gcra' then
  local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
  -- an arrival time further ahead than a full burst, within ~115 days, is the clock stepped
  -- back (Redis TIME after a failover), not garbage: the bucket is held empty from now on,
  -- never refilled at once
  local full = n + burst * interval
  if value and value > full and value <= n + 10000000000 then
    value = full
    redis.call('SET', KEYS[1], string.format('%.6f', full), 'PX', math.ceil(full - n + 1000))
  end
  local tat = sane(value, 0, n + (burst + 1) * interval + 1000) or n
  if tat < n then tat = n end
  local wait = tat - n - (burst - 1) * interval
  local want = tonumber(ARGV[5])
  if wait > 0.000001 then
    if want then return reset .. '0 ' .. string.format('%.6f', wait) end
    return reset .. string.format('%.6f', wait)
  end
  local took = 1
  if want then -- as many as fit now: each moves the arrival time one interval on
    took = math.max(1, math.min(want, math.floor(-wait / interval + 0.000001) + 1))
  end
  local new = tat + took * interval
  redis.call('SET', KEYS[1], string.format('%.6f', new), 'PX', math.ceil(new - n + 1000))
  if want then return reset .. took .. ' 0' end
  return reset .. '0'
end
-- budget
local maximum = tonumber(ARGV[4])
local tokens = sane(value, 0, 1e15) or maximum
tokens = tokens + tonumber(ARGV[3])
if tokens > maximum then tokens = maximum end
if tokens < 0 then tokens = 0 end
redis.call('SET', KEYS[1], string.format('%.6f', tokens), 'PX', tonumber(ARGV[5]))
return reset .. string.format('%.6f', tokens)
