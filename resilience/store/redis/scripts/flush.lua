-- flush: merge one replica's buffered outcomes into the shared window; read the state back.
-- KEYS: 1 state (hash; a count window's running totals in tc, tf, ts, and the window's kind,
--       size and width in wk, ws, ww for status tools), 2 window (list of "calls failures
--       slow" chunks, or hash of time buckets "c<epoch>", "f<epoch>", "s<epoch>"), 3 probes,
--       4 replicas (hash: replica id -> "last seen ms, calls, failures, slow, last sequence,
--       refused calls, latency histogram")
-- ARGV: 1 generation the outcomes were counted under (also the caller's floor: see load),
--       2 calls, 3 failures, 4 slow calls,
--       5 window kind ("c" count, "t" time), 6 window size (calls) or bucket count,
--       7 bucket width in ms (time windows; may have a fraction), 8 now in ms ("" = server
--       TIME), 9 ttl in ms, 10 replica id, 11 the flush's sequence number (per replica,
--       increasing): a flush sent again after its reply was lost is not counted twice,
--       12 calls this replica refused, 13 its sampled latency histogram ("n,n,...", up to
--       its last count that is not 0); both running totals, kept as they are (status tools)
-- Returns: fleet(...) + {'calls', c, 'failures', f, 'slow', s}: the window's counts after the
-- merge. fleet's reset is the sum of what was found and reset: 1 the state hash or probes
-- (load), 2 a window of another type, 4 a window's data, 8 a replicas key of another type.
-- (Starts with prelude.lua: now_ms, own, int, count, load, fleet, append, MAX_INT.)
-- Outcomes are merged only while the state is still CLOSED at that generation. A count
-- window costs O(1) per flush whatever its size: running totals, chunks trimmed at the old end.
local now = now_ms(ARGV[8])
local state, gen, open_until, reopens, reset = load(KEYS, ARGV[1], now)
local kind = ARGV[5]
reset = reset + 2 * own(KEYS[2], (kind == 'c') and 'list' or 'hash') + 8 * own(KEYS[4], 'hash')
local pc, pf, ps, pq = 0, 0, 0, -1
local prev = redis.call('HGET', KEYS[4], ARGV[10])
if prev then
  local _, c, f, s, q = string.match(prev, '^(%S+) (%d+) (%d+) (%d+) ?(%d*)')
  pc, pf, ps = int(c, 0, MAX_INT) or 0, int(f, 0, MAX_INT) or 0, int(s, 0, MAX_INT) or 0
  pq = int(q, 0, MAX_INT) or -1
end
local seq = int(ARGV[11], 0, MAX_INT) or 0
local ac, af, as = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh = seq > pq
local add = fresh and state == 'closed' and gen == tonumber(ARGV[1]) and ac > 0
local calls, failures, slow = 0, 0, 0
if kind == 'c' then
  local size = tonumber(ARGV[6])
  local t = redis.call('HMGET', KEYS[1], 'tc', 'tf', 'ts')
  calls, failures, slow = int(t[1], 0, MAX_INT), int(t[2], 0, MAX_INT), int(t[3], 0, MAX_INT)
  if not (calls and failures and slow and failures <= calls and slow <= calls) then
    if t[1] or t[2] or t[3] then reset = reset + 4 end
    redis.call('DEL', KEYS[2])
    calls, failures, slow = 0, 0, 0
  end
  if add then
    redis.call('RPUSH', KEYS[2], ac .. ' ' .. af .. ' ' .. as)
    calls, failures, slow = calls + ac, failures + af, slow + as
  end
  -- trim the oldest chunks until the window holds `size` calls (amortised O(1): each chunk
  -- is pushed once and popped once); a chunk cut in two keeps its share of failures
  while calls > size do
    local c, f, s = string.match(redis.call('LINDEX', KEYS[2], 0) or '', '^(%d+) (%d+) (%d+)$')
    c, f, s = int(c, 1, MAX_INT), int(f, 0, MAX_INT), int(s, 0, MAX_INT)
    if not (c and f and s and f <= c and s <= c and c <= calls) then
      redis.call('DEL', KEYS[2])
      calls, failures, slow = 0, 0, 0
      reset = reset + 4
      break
    end
    if calls - c >= size then
      redis.call('LPOP', KEYS[2])
      calls, failures, slow = calls - c, failures - f, slow - s
    else
      local room = c - (calls - size)
      local nf, ns = math.floor(f * room / c + 0.5), math.floor(s * room / c + 0.5)
      redis.call('LSET', KEYS[2], 0, room .. ' ' .. nf .. ' ' .. ns)
      calls, failures, slow = size, failures - f + nf, slow - s + ns
    end
  end
  if failures > calls then failures = calls end
  if slow > calls then slow = calls end
  redis.call('HSET', KEYS[1], 'tc', calls, 'tf', failures, 'ts', slow)
else
  local buckets, width = tonumber(ARGV[6]), tonumber(ARGV[7])
  local epoch = math.floor(now / width)
  -- bounded by the bucket count, not by the calls; every count is checked before one is
  -- added to (HINCRBY would answer an error for "1.5", failing the whole round)
  local all = redis.call('HGETALL', KEYS[2])
  local garbage = false
  for i = 1, #all, 2 do
    local field, value = all[i], count(all[i + 1])
    local tag, e = string.sub(field, 1, 1), tonumber(string.sub(field, 2))
    if not e or not value or (tag ~= 'c' and tag ~= 'f' and tag ~= 's') then
      redis.call('HDEL', KEYS[2], field)
      garbage = true
    elseif e <= epoch - buckets or e > epoch + 1 then
      redis.call('HDEL', KEYS[2], field)
    elseif tag == 'c' then calls = calls + value
    elseif tag == 'f' then failures = failures + value
    else slow = slow + value
    end
  end
  if garbage then reset = reset + 4 end
  if add then
    redis.call('HINCRBY', KEYS[2], 'c' .. epoch, ac)
    redis.call('HINCRBY', KEYS[2], 'f' .. epoch, af)
    redis.call('HINCRBY', KEYS[2], 's' .. epoch, as)
    calls, failures, slow = calls + ac, failures + af, slow + as
  end
  if failures > calls then failures = calls end
  if slow > calls then slow = calls end
end
local ttl = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], 'wk', kind, 'ws', ARGV[6], 'ww', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if fresh then
  pc, pf, ps, pq = pc + ac, pf + af, ps + as, seq
end
-- a heartbeat per replica; replicas silent for 10 minutes are dropped (checked for one
-- other replica per flush, so the cost does not grow with the fleet)
local other = redis.call('HRANDFIELD', KEYS[4])
if other and other ~= ARGV[10] then
  local at = tonumber(string.match(redis.call('HGET', KEYS[4], other) or '', '^(%S+)'))
  if not at or at ~= at or at < now - 600000 then redis.call('HDEL', KEYS[4], other) end
end
local rejected = int(ARGV[12], 0, MAX_INT) or 0
local latency = ARGV[13] or ''
if #latency > 400 or not string.match(latency, '^[%d,]*$') then latency = '' end
redis.call('HSET', KEYS[4], ARGV[10],
  now .. ' ' .. pc .. ' ' .. pf .. ' ' .. ps .. ' ' .. pq .. ' ' .. rejected .. ' ' .. latency)
redis.call('PEXPIRE', KEYS[4], ttl)
return append(fleet(state, gen, open_until, reopens, now, reset),
  'calls', calls, 'failures', failures, 'slow', slow)
