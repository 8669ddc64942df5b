-- transition: compare-and-set the breaker state by generation, then announce it.
-- KEYS: 1 state, 2 window, 3 probes
-- ARGV: 1 expected generation, 2 new state, 3 open time in ms (for "open"),
--       4 new re-open count, 5 now in ms ("" = TIME), 6 ttl in ms, 7 channel,
--       8 breaker name, 9 mode: "0" compare-and-set, "1" apply whatever the generation
--       (manual control), "q" a quorum vote, "r" renumber (both below), 10-12 the calls,
--       failures and slow calls that open it (kept for status tools), 13 quorum, 14 the
--       caller's replica id, 15 how long its vote lasts (ms), 16 the caller's floor (a
--       generation it reported: see SharedBreakerCore.sending), 17 the longest a vote lasts
--       (ms)
-- Returns: fleet(...) + {'changed', 0|1, 'votes', n: the live votes after a quorum vote}; a
-- reset of 16 in fleet: a vote, "vg" or "fl" field that was not ours (replaced or deleted).
-- (Starts with prelude.lua: now_ms, int, load, publish, fleet, append, MAX_INT, FAR_MS.)
-- Generations: a transition numbers the new state above the stored generation, the caller's
-- floor and "fl" (the highest floor a renumbering could not apply yet), so no replica sees
-- the fleet numbered below a generation it reported (a replica that decided alone while
-- Redis was away, or a quorum breaker's own trip, numbered its own moves).
-- Renumber ("r", at the expected generation): an open (forced open, disabled) breaker takes
-- the caller's floor as its generation at once; a closed or half-open one keeps its number
-- (outcomes, votes and probes in flight carry it) and keeps the floor in "fl" for its next
-- transition.
-- A quorum vote: a replica whose own window tripped asks for OPEN while the fleet is CLOSED
-- at the expected generation. Votes are fields "v.<replica>" -> expiry (server ms) of the
-- state hash, for generation "vg" only; the fleet opens once `quorum` live votes are in, for
-- the open time the caller sends (the fleet's first: the replicas' own back-off is theirs).
-- A vote lasts at most ARGV[17] ms unless renewed; an expiry that is not a time within that
-- (nan, inf, 1e300, text) is not a vote we wrote: deleted and reported as a reset. A vote
-- for "closed" withdraws the caller's vote (its store is closing).
local now = now_ms(ARGV[5])
local state, gen, open_until, reopens, reset = load(KEYS, ARGV[1], now)
local mode = ARGV[9]
local floor = int(ARGV[16], 0, MAX_INT) or 0
local longest = int(ARGV[17], 0, FAR_MS) or 0
local garbage = 0
local fl = redis.call('HGET', KEYS[1], 'fl')
if fl then
  fl = int(fl, 0, MAX_INT)
  if not fl then
    redis.call('HDEL', KEYS[1], 'fl')
    garbage = 16
  end
end
fl = fl or 0

local function answer(changed, live)
  local t = fleet(state, gen, open_until, reopens, now, reset + garbage)
  return append(append(t, 'changed', changed), 'votes', live)
end

-- votes(clear): how many votes are live; lapsed ones (and garbage) are deleted, all if clear
local function votes(clear)
  local live = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'v.' then
      local expiry = int(all[i + 1], 0, now + longest)
      if not expiry then garbage = 16 end
      if clear or not expiry or expiry <= now then redis.call('HDEL', KEYS[1], all[i])
      else live = live + 1 end
    end
  end
  return live
end

if mode == 'q' and ARGV[2] == 'closed' then
  redis.call('HDEL', KEYS[1], 'v.' .. ARGV[14])
  return answer(0, 0)
end
if mode ~= '1' and gen ~= tonumber(ARGV[1]) then return answer(0, 0) end
if mode == 'r' then
  if floor <= gen then return answer(0, 0) end
  if state == 'closed' or state == 'half_open' then
    if floor > fl then redis.call('HSET', KEYS[1], 'fl', floor) end
    return answer(0, 0)
  end
  gen = floor
  redis.call('HSET', KEYS[1], 'gen', gen)
  publish(ARGV[7], ARGV[8], state, gen, open_until, reopens, now)
  return answer(1, 0)
end
if mode == 'q' then
  if state ~= 'closed' then return answer(0, 0) end
  local vg = redis.call('HGET', KEYS[1], 'vg')
  if vg and not int(vg, 0, MAX_INT) then garbage = 16 end
  if tonumber(vg) ~= gen then
    votes(true)
    redis.call('HSET', KEYS[1], 'vg', gen)
  end
  local life = math.min(int(ARGV[15], 0, FAR_MS) or 0, longest)
  redis.call('HSET', KEYS[1], 'v.' .. ARGV[14], now + life)
  local live = votes(false)
  if live < (tonumber(ARGV[13]) or 1) then return answer(0, live) end
  votes(true)
end
gen = math.max(gen, floor, fl) + 1
state = ARGV[2]
reopens = tonumber(ARGV[4])
open_until = 0
if state == 'open' then open_until = now + tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'open_until', open_until,
  'reopens', reopens, 'pd', 0, 'pf', 0, 'ps', 0, 'tc', 0, 'tf', 0, 'ts', 0,
  'oc', tonumber(ARGV[10]) or 0, 'of', tonumber(ARGV[11]) or 0, 'os', tonumber(ARGV[12]) or 0)
redis.call('HDEL', KEYS[1], 'fl')
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))
publish(ARGV[7], ARGV[8], state, gen, open_until, reopens, now)
return answer(1, 0)
