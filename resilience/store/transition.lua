-- transition: compare-and-set the breaker state by generation, then announce it.
-- KEYS: 1 state, 2 window, 3 probes
-- ARGV: 1 expected generation, 2 new state, 3 open time in ms (for "open"),
--       4 new re-open count, 5 now in ms ("" = TIME), 6 ttl in ms, 7 channel,
--       8 breaker name, 9 "1" to apply whatever the generation (manual control), or "q": a
--       quorum vote (below), 10-12 the calls, failures and slow calls that open it (kept
--       for status tools), 13 quorum, 14 the voting replica, 15 how long its vote lasts (ms)
-- Returns: fleet(...) + {'changed', 0|1, 'votes', n}
-- A quorum vote: a replica whose own window tripped asks for OPEN while the fleet is CLOSED
-- at the expected generation. Votes are fields "v.<replica>" -> expiry (server ms) of the
-- state hash, for generation "vg" only; the fleet opens once `quorum` live votes are in.
local now = now_ms(ARGV[5])
local state, gen, open_until, reopens, reset = load(KEYS, ARGV[1], now)
local function votes(clear)
  local live = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'v.' then
      if clear or (tonumber(all[i + 1]) or 0) <= now then redis.call('HDEL', KEYS[1], all[i])
      else live = live + 1 end
    end
  end
  return live
end
if ARGV[9] ~= '1' and gen ~= tonumber(ARGV[1]) then
  return append(append(fleet(state, gen, open_until, reopens, now, reset), 'changed', 0),
    'votes', 0)
end
if ARGV[9] == 'q' then
  if state ~= 'closed' then
    return append(append(fleet(state, gen, open_until, reopens, now, reset), 'changed', 0),
      'votes', 0)
  end
  if tonumber(redis.call('HGET', KEYS[1], 'vg')) ~= gen then
    votes(true)
    redis.call('HSET', KEYS[1], 'vg', gen)
  end
  redis.call('HSET', KEYS[1], 'v.' .. ARGV[14], now + (tonumber(ARGV[15]) or 0))
  local live = votes(false)
  if live < (tonumber(ARGV[13]) or 1) then
    return append(append(fleet(state, gen, open_until, reopens, now, reset), 'changed', 0),
      'votes', live)
  end
  votes(true)
end
gen = gen + 1
state = ARGV[2]
reopens = tonumber(ARGV[4])
open_until = 0
if state == 'open' then open_until = now + tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'open_until', open_until,
  'reopens', reopens, 'pd', 0, 'pf', 0, 'ps', 0, 'tc', 0, 'tf', 0, 'ts', 0,
  'oc', tonumber(ARGV[10]) or 0, 'of', tonumber(ARGV[11]) or 0, 'os', tonumber(ARGV[12]) or 0)
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))
publish(ARGV[7], ARGV[8], state, gen, open_until, reopens, now)
return append(append(fleet(state, gen, open_until, reopens, now, reset), 'changed', 1),
  'votes', 0)
