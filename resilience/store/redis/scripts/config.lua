-- config: a policy name's live settings (resilience/store/config.py), versioned.
-- KEYS: 1 head (hash: version, values, epoch), 2 history (list of JSON changes, newest first),
--       3 base (hash: policy kind -> JSON of the values in code a replica reported)
-- ARGV: 1 op:
--   "read": -> {reset, version, values, epoch, #bases, kind, json, ..., change, change, ...}
--   "base": 2 kind, 3 its values in code (JSON), 4 ttl ms: kept, then as "read"
--   "set": 2 the version the change was checked against, 3 values (JSON), 4 origin (a JSON
--          string), 5 the version a rollback restores ("" for none), 6 now in ms ("" =
--          server TIME), 7 ttl ms, 8 changes kept, 9 channel, 10 name (a JSON string),
--          11 an epoch for a history that starts here (letters and digits)
--          -> {version, epoch}, or {-1} when the head is no longer the version checked
--          against (another change won: the caller reads and checks again). The change is
--          published on the channel as JSON: {"config": name, "version", "values", "origin",
--          "epoch"}.
-- The epoch names a history: written in the head when it is created (its first change, or
-- the first one after Redis lost the head), kept by every later change. Versions count up
-- within an epoch only; a head of another epoch is another history (versions from 1 again).
-- The values are written by the caller (JSON it made); a key of another type, or a head
-- whose version does not parse, is deleted first (reset = 1): bad data costs the settings
-- of this name, never an error reply.
local reset = 0
local types = {'hash', 'list', 'hash'}
for i = 1, 3 do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= types[i] and kind ~= 'none' then
    redis.call('DEL', KEYS[i])
    reset = 1
  end
end
local head = redis.call('HMGET', KEYS[1], 'version', 'values', 'epoch')
local version = tonumber(head[1])
if head[1] and not (version and version >= 0 and version == math.floor(version)) then
  redis.call('DEL', KEYS[1], KEYS[2])
  reset, version, head = 1, nil, {false, false, false}
end
version = version or 0
local epoch = head[3]
if epoch and not string.match(epoch, '^%w+$') then epoch = false end  -- not ours: a new one
local op = ARGV[1]

if op == 'set' then
  if tonumber(ARGV[2]) ~= version then return {-1} end
  version = version + 1
  epoch = epoch or ARGV[11]
  local now = tonumber(ARGV[6])
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local rollback = ARGV[5] == '' and 'null' or tostring(tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'version', version, 'values', ARGV[3], 'epoch', epoch)
  redis.call('LPUSH', KEYS[2], '{"version":' .. version .. ',"values":' .. ARGV[3] ..
    ',"at":' .. string.format('%.3f', now / 1000) .. ',"origin":' .. ARGV[4] ..
    ',"rollback_of":' .. rollback .. '}')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[8]) - 1)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end
  redis.call('PUBLISH', ARGV[9], '{"config":' .. ARGV[10] .. ',"version":' .. version ..
    ',"values":' .. ARGV[3] .. ',"origin":' .. ARGV[4] .. ',"epoch":"' .. epoch .. '"}')
  return {version, epoch}
end

if op == 'base' then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
end
local bases = redis.call('HGETALL', KEYS[3])
local reply = {reset, version, head[2] or '{}', epoch or '', #bases / 2}
for _, item in ipairs(bases) do table.insert(reply, item) end
for _, change in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(reply, change) end
return reply
