-- Shared prelude of every presence script (prepended to each body by presence/redis.rs).
-- ARGV[1] presence TTL (ms)   ARGV[2] offline grace (ms)
-- ARGV[3] events stream cap   ARGV[4] events stream TTL (ms)
-- Defines `now` and `exp` in Redis-server milliseconds, `extend` (grows a key's TTL, never
-- shrinks it), `emit` (appends an online/offline event to the events stream and publishes
-- it) and `settle_due` (emits an offline that is due before a user comes back).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local events_max = tonumber(ARGV[3])
local events_ttl = tonumber(ARGV[4])
local function ms(x) return string.format('%.0f', x) end
local exp = ms(now + ttl)
local function extend(key, min)
  min = min or ttl
  if redis.call('PTTL', key) < min then redis.call('PEXPIRE', key, min) end
end
local function emit(events, kind, uid, reason, node)
  local fields = {'type', kind, 'user', uid, 'ts', ms(now)}
  local ev = {type = kind, user = uid, ts = now}
  if reason ~= '' then
    table.insert(fields, 'reason'); table.insert(fields, reason); ev.reason = reason
  end
  if node ~= '' then
    table.insert(fields, 'node'); table.insert(fields, node); ev.node = node
  end
  ev.id = redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', unpack(fields))
  extend(events, events_ttl)
  redis.call('PUBLISH', events, cjson.encode(ev))
end
-- A user is online while their users-score is above now + grace, pending offline while it
-- is between now and now + grace, and due for an offline event once it is below now.
local function settle_due(users, events, pending, uid)
  local known = redis.call('ZSCORE', users, uid)
  if known and tonumber(known) <= now then
    emit(events, 'offline', uid, redis.call('HGET', pending, uid) or 'expired', '')
    redis.call('HDEL', pending, uid)
    return false
  end
  if known and tonumber(known) <= now + grace then redis.call('HDEL', pending, uid) end
  return known
end
