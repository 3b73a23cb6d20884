-- Shared prelude of every presence script (prepended to each body by presence/redis.rs).
-- ARGV[1] presence TTL (ms)   ARGV[2] offline grace (ms)
-- ARGV[3] events stream cap   ARGV[4] events stream TTL (ms)
-- ARGV[5] '1' when events are written here (one Redis: the script also declares the events
--         stream and the online index as its last two KEYS), '0' when they are handed back
--         to the node (Redis Cluster: those keys live in another slot; the node appends them
--         with events_append.lua)
-- Defines `now` and `exp` in Redis-server milliseconds, `extend` (grows a key's TTL, never
-- shrinks it), `emit` (records an online/offline event), `deferred` (events to hand back)
-- and `done` (the script's reply: its result followed by the deferred events).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local events_max = tonumber(ARGV[3])
local events_ttl = tonumber(ARGV[4])
local inline = ARGV[5] == '1'
local function ms(x) return string.format('%.0f', x) end
local exp = ms(now + ttl)
local function extend(key, min)
  min = min or ttl
  if redis.call('PTTL', key) < min then redis.call('PEXPIRE', key, min) end
end
local deferred = {}
-- Appends an event to the stream, publishes it and keeps the online index (members: users
-- whose last event was `online`) in step. The stream and the index share one slot.
local function append(events, online, ev)
  local fields = {'type', ev.type, 'user', ev.user, 'ts', ms(ev.ts)}
  if ev.reason then table.insert(fields, 'reason'); table.insert(fields, ev.reason) end
  if ev.node then table.insert(fields, 'node'); table.insert(fields, ev.node) end
  ev.id = redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', unpack(fields))
  extend(events, events_ttl)
  if ev.type == 'online' then
    redis.call('ZADD', online, ms(ev.ts), ev.user)
  else
    redis.call('ZREM', online, ev.user)
  end
  extend(online, events_ttl)
  redis.call('PUBLISH', events, cjson.encode(ev))
end
local function emit(kind, uid, reason, node)
  local ev = {type = kind, user = uid, ts = now}
  if reason ~= '' then ev.reason = reason end
  if node ~= '' then ev.node = node end
  if inline then
    append(KEYS[#KEYS - 1], KEYS[#KEYS], ev)
  else
    table.insert(deferred, cjson.encode(ev))
  end
end
-- The reply: {result, extra, event...}; `extra` is '' unless the script has something to
-- add (a due time).
-- Keeps a user's entry in the online index without an event: `grace` when the offline
-- grace window starts (score -1: not counted as online), `back` when it is cancelled
-- (score = now). Events themselves move the index in `append`.
local function mark(uid, what)
  if inline then
    local score = what == 'back' and ms(now) or '-1'
    redis.call('ZADD', KEYS[#KEYS], score, uid)
  else
    table.insert(deferred, cjson.encode({mark = what, user = uid, ts = now}))
  end
end
local function done(result, extra)
  return {result, extra or '', unpack(deferred)}
end
-- The presence hash of a user holds one field per session (`<session>` ->
-- `<lease>|<connected_at>`) and the field '=' with the user's state: 'on' (online), or
-- 'off|<due ms>|<reason>' (the last session closed; `offline` is due at <due> unless a
-- session comes back first). No '=' means offline with nothing pending.
local function sessions_left(key)
  local n = redis.call('HLEN', key)
  if redis.call('HEXISTS', key, '=') == 1 then n = n - 1 end
  return n
end
-- Parses 'off|<due>|<reason>' into due, reason.
local function pending(state)
  local due, reason = string.match(state or '', '^off|(%d+)|(.*)$')
  if not due then return nil end
  return tonumber(due), reason
end
-- Marks a user back online: cancels a pending offline within the grace window (no events),
-- settles one that is already due first (so online and offline always alternate), emits
-- `online` for a user who was offline.
local function come_online(key, uid, state, node)
  if state == 'on' then return end
  local due, reason = pending(state)
  if due and due <= now then
    emit('offline', uid, reason, '')
    due = nil
  end
  redis.call('HSET', key, '=', 'on')
  if due then mark(uid, 'back') else emit('online', uid, '', node) end
end
