-- Shared by the breaker scripts, the shared window, status, shares and names (prepended to
-- each: see script_source). Each call of a script runs this (a closure per function): the
-- scripts of the fleet-wide primitives, called as often as calls are made, carry none of it.

-- now_ms(arg, keep): the caller's time if given (a store on a fake clock), else the server's
-- TIME; whole milliseconds, but a caller's time is kept as it is with `keep` (the shared
-- window's bucket edges then match MemoryStore's).
local function now_ms(arg, keep)
  local n = tonumber(arg)
  if n then return keep and n or math.floor(n) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- own(key, kind): a key of another type than `kind` ('hash', 'set', 'zset', ...) holds data we
-- never write there: it is deleted. Returns 1 if it was (the caller reports a reset), else 0
-- (a missing key is ours: empty).
local function own(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found == kind or found == 'none' then return 0 end
  redis.call('DEL', key)
  return 1
end

local STATES = {closed = true, open = true, half_open = true, forced_open = true, disabled = true}
local MAX_INT = 4503599627370496 -- 2^52: beyond it, doubles stop counting by one
local FAR_MS = 10000000000 -- about 115 days: no deadline we write lies further ahead

-- int(v, lo, hi): v as an integer in [lo, hi], else nil (nan, inf, 1e300, fractions, text).
local function int(v, lo, hi)
  local n = tonumber(v)
  if n and n == n and n >= lo and n <= hi and n == math.floor(n) then return n end
  return nil
end

-- count(raw): a stored count as we write it (digits only: no sign, no leading zero, no
-- exponent, no blank), at most MAX_INT, else nil. Stricter than int(): it is what HINCRBY
-- accepts, so a field that passes can be added to without an error reply.
local function count(raw)
  if raw ~= '0' and not string.match(raw, '^[1-9]%d*$') then return nil end
  return int(raw, 0, MAX_INT)
end

-- load(KEYS[1..3] = state, win, probes; floor, now): read and check the state hash. `floor` is
-- the highest generation the caller has seen: a stored generation below it (Redis lost data)
-- is raised to it, so the fleet converges on the highest. A missing hash starts CLOSED at
-- `floor`; one that is not what we write (wrong type, unknown state, a number out of range) is
-- reset at `floor + 1`, with its window and probes; probes of another type are deleted.
-- Returns state, gen, open_until, reopens, reset (1 = garbage reset).
local function load(keys, floor, now)
  floor = int(floor, 0, MAX_INT) or 0
  local kind = redis.call('TYPE', keys[1])['ok']
  if kind == 'hash' then
    local v = redis.call('HMGET', keys[1], 'state', 'gen', 'open_until', 'reopens')
    local gen, reopens = int(v[2], 0, MAX_INT), int(v[4], 0, 1000000)
    local open_until = int(v[3], 0, now + FAR_MS)
    if STATES[v[1]] and gen and open_until and reopens then
      if floor > gen then
        gen = floor
        redis.call('HSET', keys[1], 'gen', gen)
      end
      return v[1], gen, open_until, reopens, own(keys[3], 'zset')
    end
  end
  local reset = 0
  if kind ~= 'none' then
    reset = 1
    floor = floor + 1
  end
  redis.call('DEL', keys[1], keys[2], keys[3])
  redis.call('HSET', keys[1], 'state', 'closed', 'gen', floor, 'open_until', 0, 'reopens', 0,
    'pd', 0, 'pf', 0, 'ps', 0, 'tc', 0, 'tf', 0, 'ts', 0)
  return 'closed', floor, 0, 0, reset
end

local function publish(channel, name, state, gen, open_until, reopens, now)
  redis.call('PUBLISH', channel,
    gen .. ' ' .. state .. ' ' .. open_until .. ' ' .. reopens .. ' ' .. now .. ' ' .. name)
end

-- fleet(...): the named fields every breaker script answers with (parsed in one place).
local function fleet(state, gen, open_until, reopens, now, reset)
  return {'state', state, 'gen', gen, 'open_until', open_until, 'reopens', reopens, 'now', now,
    'reset', reset}
end

local function append(t, ...)
  local extra = {...}
  for i = 1, #extra do t[#t + 1] = extra[i] end
  return t
end
