-- flush: merge one replica's buffered outcomes into the shared window; read the state back.
-- KEYS: 1 state (hash), 2 window (list of "calls failures slow" chunks, or hash of buckets),
--       3 probes (zset), 4 replicas (hash: replica id -> "last seen ms, calls, failures, slow",
--       the outcomes it has flushed so far)
-- ARGV: 1 generation the outcomes were counted under, 2 calls, 3 failures, 4 slow calls,
--       5 window kind ("c" count, "t" time), 6 window size (calls) or bucket count,
--       7 bucket width in ms (time windows), 8 now in ms ("" = server TIME), 9 ttl in ms,
--       10 replica id, 11 the flush's sequence number (per replica, increasing): a flush
--       sent again after its reply was lost is recognised and not counted twice
-- Returns: {state, gen, open_until, reopens, calls, failures, slow, now, reset}
-- Outcomes are merged only while the state is still CLOSED at that generation.
local now = now_ms(ARGV[8])
local state, gen, open_until, reopens, reset = load(KEYS, ARGV[1])
local kind = ARGV[5]
local want = (kind == 'c') and 'list' or 'hash'
local wtype = redis.call('TYPE', KEYS[2])['ok']
if wtype ~= 'none' and wtype ~= want then
  redis.call('DEL', KEYS[2])
  reset = reset + 2
end
-- who reported what: "last seen ms, calls, failures, slow, last sequence number" per replica
local rtype = redis.call('TYPE', KEYS[4])['ok']
if rtype ~= 'hash' and rtype ~= 'none' then
  redis.call('DEL', KEYS[4])
  reset = reset + 8
end
local pc, pf, ps, pq = 0, 0, 0, -1
local prev = redis.call('HGET', KEYS[4], ARGV[10])
if prev then
  local _, c, f, s, q = string.match(prev, '^(%S+) (%d+) (%d+) (%d+) ?(%d*)$')
  pc, pf, ps, pq = tonumber(c) or 0, tonumber(f) or 0, tonumber(s) or 0, tonumber(q) or -1
end
local seq = tonumber(ARGV[11]) or 0
local fresh = seq > pq
local add = fresh and state == 'closed' and gen == tonumber(ARGV[1]) and tonumber(ARGV[2]) > 0
local calls, failures, slow = 0, 0, 0
if kind == 'c' then
  local size = tonumber(ARGV[6])
  if add then
    redis.call('RPUSH', KEYS[2], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
  end
  local chunks = redis.call('LRANGE', KEYS[2], 0, -1)
  local keep = 0
  for i = #chunks, 1, -1 do
    local c, f, s = string.match(chunks[i], '^(%d+) (%d+) (%d+)$')
    c, f, s = tonumber(c), tonumber(f), tonumber(s)
    if not c or c < 1 or f > c or s > c then
      reset = reset + 4
      break
    end
    keep = keep + 1
    if calls + c >= size then
      local room = size - calls
      if room < c then -- keep the newest `room` calls of this chunk, pro rata
        f = math.floor(f * room / c + 0.5)
        s = math.floor(s * room / c + 0.5)
        c = room
        redis.call('LSET', KEYS[2], i - 1, c .. ' ' .. f .. ' ' .. s)
      end
      calls, failures, slow = calls + c, failures + f, slow + s
      break
    end
    calls, failures, slow = calls + c, failures + f, slow + s
  end
  if keep < #chunks then
    redis.call('LTRIM', KEYS[2], #chunks - keep, -1)
  end
else
  local buckets, width = tonumber(ARGV[6]), tonumber(ARGV[7])
  local epoch = math.floor(now / width)
  if add then
    redis.call('HINCRBY', KEYS[2], 'c' .. epoch, ARGV[2])
    redis.call('HINCRBY', KEYS[2], 'f' .. epoch, ARGV[3])
    redis.call('HINCRBY', KEYS[2], 's' .. epoch, ARGV[4])
  end
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local field, value = all[i], tonumber(all[i + 1])
    local tag, e = string.sub(field, 1, 1), tonumber(string.sub(field, 2))
    if not e or not value or e <= epoch - buckets or e > epoch + 1 then
      redis.call('HDEL', KEYS[2], field)
    elseif tag == 'c' then calls = calls + value
    elseif tag == 'f' then failures = failures + value
    elseif tag == 's' then slow = slow + value
    else redis.call('HDEL', KEYS[2], field)
    end
  end
end
local ttl = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], 'wk', kind, 'ws', ARGV[6], 'ww', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
-- a heartbeat per replica; replicas silent for 10 minutes are dropped
local seen = redis.call('HGETALL', KEYS[4])
for i = 1, #seen, 2 do
  local at = tonumber(string.match(seen[i + 1], '^(%S+)'))
  if not at or at < now - 600000 then redis.call('HDEL', KEYS[4], seen[i]) end
end
if fresh then
  pc, pf, ps, pq = pc + tonumber(ARGV[2]), pf + tonumber(ARGV[3]), ps + tonumber(ARGV[4]), seq
end
redis.call('HSET', KEYS[4], ARGV[10], now .. ' ' .. pc .. ' ' .. pf .. ' ' .. ps .. ' ' .. pq)
redis.call('PEXPIRE', KEYS[4], ttl)
return {state, gen, open_until, reopens, calls, failures, slow, now, reset}
