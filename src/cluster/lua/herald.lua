#!lua name=herald
-- The herald Functions library: every operation on the durable inbox. Nodes load it with
-- FUNCTION LOAD REPLACE at start-up and after Redis restarts, with the upper-case
-- placeholders below replaced by the deployment's settings (so every node of a deployment must run with the
-- same --prefix, --inbox-max-len, --inbox-retention, --max-message-bytes and
-- --idempotency-window; one Redis serves one herald deployment).
--
-- Keys of one user, all built by `key(kind, uid)` below and by src/cluster/keys.rs, all with
-- the user id as their hash tag so that they share one Redis Cluster slot:
--   <p>:inbox:{<uid>}     STREAM, entries {d = payload [, x = expiry ms]}
--   <p>:cursor:{<uid>}    STRING, the last acknowledged id
--   <p>:gone:{<uid>}      ZSET of withdrawn ids (retracted, or replaced by a collapse key),
--                         score = their ms; replay and reads skip them
--   <p>:trimmed:{<uid>}   STRING, the newest id the length or age cap removed: a replay from
--                         before it is incomplete
--   <p>:collapse:{<uid>}:<key>  STRING, the id that last used a collapse key
--   <p>:idem:{<uid>}:<key>      STRING, the id an idempotency key produced
-- and the channel <p>:user:{<uid>}, where herald_notify publishes `\0<meta>\0<payload>`.
--
-- Public (the producer contract, docs/redis.md):
--   FCALL herald_notify 1 <p>:inbox:{<uid>} <payload> [idem <key>] [ttl <seconds>] [collapse <key>]
-- Internal (called by nodes): herald_open, herald_page, herald_ack, herald_retract,
-- herald_config.

local PREFIX = '__PREFIX__'
local MAXLEN = __MAX_LEN__
local RETENTION = __RETENTION_MS__
local MAX_BYTES = __MAX_BYTES__
local IDEM_WINDOW = __IDEMPOTENCY_WINDOW_MS__
local UNREAD_CAP = __UNREAD_CAP__
local VERSION = 3

local function fail(msg)
  return redis.error_reply('herald: ' .. msg)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ms_text(x)
  return string.format('%.0f', x)
end

-- Every key and channel of a user carries the user id as a Redis Cluster hash tag
-- (`{<uid>}`; user ids never contain braces), so all of them live in one slot and a
-- Function may touch them together on a cluster.
local function key(kind, uid)
  return PREFIX .. ':' .. kind .. ':{' .. uid .. '}'
end

-- A key for one of a user's option keys (collapse, idem). The closing brace ends the user
-- id, so no user's key can collide with another's.
local function option_key(kind, uid, k)
  return PREFIX .. ':' .. kind .. ':{' .. uid .. '}:' .. k
end

-- Compares two canonical stream ids exactly (as decimal strings, no float rounding).
local function num_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then return 0 end
  return a < b and -1 or 1
end

local function id_cmp(a, b)
  local am, as = string.match(a, '^(%d+)%-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)%-(%d+)$')
  local c = num_cmp(am, bm)
  if c ~= 0 then return c end
  return num_cmp(as, bs)
end

local function id_ms(id)
  return tonumber(string.match(id, '^(%d+)%-'))
end

-- A canonical stream id: <ms>-<seq>, decimal without leading zeros, each at most 20 digits.
local function valid_id(s)
  return type(s) == 'string' and #s <= 41 and string.match(s, '^%d+%-%d+$') ~= nil
    and string.match(s, '^0%d') == nil and string.match(s, '%-0%d') == nil
end

-- The rule of src/protocol.rs `valid_name`: 1-256 bytes of UTF-8 without control,
-- white-space (Unicode Cc and White_Space) or invisible characters (`invisible` there), and
-- without braces (the id is a Redis Cluster hash tag in every key).
local SINGLE = {
  [0x85] = true, [0xA0] = true, [0x1680] = true, [0x2028] = true, [0x2029] = true,
  [0x202F] = true, [0x205F] = true, [0x3000] = true,
  [0xAD] = true, [0x61C] = true, [0x115F] = true, [0x1160] = true, [0x180E] = true,
  [0x3164] = true, [0xFEFF] = true, [0xFFA0] = true,
}
local function bad_char(c)
  return c <= 0x20 or c == 0x7B or c == 0x7D or (c >= 0x7F and c <= 0x9F) or SINGLE[c]
    or (c >= 0x2000 and c <= 0x200F) or (c >= 0x202A and c <= 0x202E)
    or (c >= 0x2060 and c <= 0x206F) or (c >= 0xFFF9 and c <= 0xFFFB)
end

local function valid_name(s)
  if type(s) ~= 'string' or #s == 0 or #s > 256 then return false end
  local i, n = 1, #s
  while i <= n do
    local b = string.byte(s, i)
    local c, len
    if b < 0x80 then c, len = b, 1
    elseif b >= 0xC2 and b <= 0xDF then c, len = b - 0xC0, 2
    elseif b >= 0xE0 and b <= 0xEF then c, len = b - 0xE0, 3
    elseif b >= 0xF0 and b <= 0xF4 then c, len = b - 0xF0, 4
    else return false end
    if i + len - 1 > n then return false end
    for k = i + 1, i + len - 1 do
      local cb = string.byte(s, k)
      if cb < 0x80 or cb > 0xBF then return false end
      c = c * 64 + (cb - 0x80)
    end
    -- Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if (len == 3 and (c < 0x800 or (c >= 0xD800 and c <= 0xDFFF)))
      or (len == 4 and (c < 0x10000 or c > 0x10FFFF)) then
      return false
    end
    if bad_char(c) then return false end
    i = i + len
  end
  return true
end

-- Option keys (idempotency and collapse keys): 1-128 printable ASCII characters.
local function valid_option_key(s)
  return type(s) == 'string' and #s >= 1 and #s <= 128 and string.match(s, '^[\33-\126]+$') ~= nil
end

-- The user id in an inbox key of this deployment, or nil.
local function user_of(inbox)
  local head = PREFIX .. ':inbox:{'
  if type(inbox) ~= 'string' or string.sub(inbox, 1, #head) ~= head
    or string.sub(inbox, -1) ~= '}' then
    return nil
  end
  local uid = string.sub(inbox, #head + 1, -2)
  if not valid_name(uid) then return nil end
  return uid
end

-- Whether an entry (a flat {field, value, ...} list) is still worth delivering at `now`.
local function alive(fields, now)
  for j = 1, #fields, 2 do
    if fields[j] == 'x' and tonumber(fields[j + 1]) and tonumber(fields[j + 1]) <= now then
      return false
    end
  end
  return true
end

local function payload_of(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'd' then return fields[j + 1] end
  end
  return nil
end

local function withdrawn(gone, id)
  return redis.call('ZSCORE', gone, id) ~= false
end

-- Up to `count` deliverable entries after `after` ('' = from the oldest). Returns the
-- flat list {next, id1, data1, ...}: `next` is the last id looked at when the page may go
-- on ('' when the end of the inbox was reached).
local function page(inbox, gone, after, count, now)
  local start = '-'
  if after ~= '' then start = '(' .. after end
  local raw = redis.call('XRANGE', inbox, start, '+', 'COUNT', count)
  local out = {''}
  for _, e in ipairs(raw) do
    local data = payload_of(e[2])
    if data and alive(e[2], now) and not withdrawn(gone, e[1]) then
      table.insert(out, e[1])
      table.insert(out, data)
    end
  end
  if #raw == count and raw[#raw] then out[1] = raw[#raw][1] end
  return out
end

-- Deliverable entries after `after`, counted up to UNREAD_CAP scanned entries.
local function count_after(inbox, gone, after, now)
  local start = '-'
  if after ~= '' then start = '(' .. after end
  local n = 0
  for _, e in ipairs(redis.call('XRANGE', inbox, start, '+', 'COUNT', UNREAD_CAP)) do
    if alive(e[2], now) and not withdrawn(gone, e[1]) then n = n + 1 end
  end
  return n
end

-- Whether entries after `since` were removed by the length or age cap (herald_notify
-- records the newest id it trimmed; withdrawn entries stay in the stream as tombstones, so
-- nothing else removes entries).
local function trimmed_after(inbox, trimmed_key, since, now)
  if redis.call('EXISTS', inbox) == 0 then
    -- Everything expired: a gap if `since` is older than the retention.
    return id_ms(since) + RETENTION < now
  end
  local newest_trimmed = redis.call('GET', trimmed_key)
  return newest_trimmed ~= false and id_cmp(newest_trimmed, since) > 0
end

-- Applies the length and age caps exactly and records the newest id they removed.
local function trim(inbox, uid, now)
  local removed = nil
  local over = redis.call('XLEN', inbox) - MAXLEN
  if over > 0 then
    local victims = redis.call('XRANGE', inbox, '-', '+', 'COUNT', over)
    removed = victims[#victims][1]
    redis.call('XTRIM', inbox, 'MAXLEN', MAXLEN)
  end
  local min_id = ms_text(now - RETENTION) .. '-0'
  local aged = redis.call('XREVRANGE', inbox, '(' .. min_id, '-', 'COUNT', 1)[1]
  if aged then
    if not removed or id_cmp(aged[1], removed) > 0 then removed = aged[1] end
    redis.call('XTRIM', inbox, 'MINID', min_id)
  end
  local trimmed_key = key('trimmed', uid)
  if removed then
    local before = redis.call('GET', trimmed_key)
    if not before or id_cmp(removed, before) > 0 then
      redis.call('SET', trimmed_key, removed, 'PX', RETENTION)
    end
  end
  if redis.call('EXISTS', trimmed_key) == 1 then redis.call('PEXPIRE', trimmed_key, RETENTION) end
end

local function publish_meta(uid, meta, payload)
  redis.call('PUBLISH', key('user', uid), '\0' .. meta .. '\0' .. (payload or ''))
end

-- herald_notify: stores a durable notification and publishes it, atomically.
-- KEYS[1] <p>:inbox:{<uid>}
-- ARGV[1] payload, then options as name/value pairs:
--   idem <key>      the same key within the idempotency window returns the first id and
--                   stores nothing
--   ttl <seconds>   replay and reads skip the entry once this has passed
--   collapse <key>  replaces the user's unread entry that last used this key
-- Returns the entry's id.
local function notify(keys, args)
  local usage = 'usage: FCALL herald_notify 1 ' .. PREFIX .. ':inbox:{<user>} <payload> '
    .. '[idem <key>] [ttl <seconds>] [collapse <key>]'
  if #keys ~= 1 or args[1] == nil then return fail(usage) end
  local inbox, payload = keys[1], args[1]
  local uid = user_of(inbox)
  if not uid then
    return fail('key must be ' .. PREFIX .. ':inbox:{<user>}, the user id 1-256 bytes of '
      .. 'UTF-8 without control or white-space characters or braces')
  end
  if #payload > MAX_BYTES then
    return fail('payload is ' .. #payload .. ' bytes; the limit is ' .. MAX_BYTES)
  end
  local idem, ttl, collapse = nil, nil, nil
  local i = 2
  while i <= #args do
    local name, value = args[i], args[i + 1]
    if value == nil then return fail('option ' .. name .. ' needs a value; ' .. usage) end
    if name == 'idem' then
      if not valid_option_key(value) then
        return fail('idem key must be 1-128 printable ASCII characters')
      end
      idem = value
    elseif name == 'ttl' then
      ttl = tonumber(value)
      if not ttl or ttl ~= math.floor(ttl) or ttl < 1 or ttl * 1000 > RETENTION then
        return fail('ttl must be whole seconds from 1 to the inbox retention ('
          .. math.floor(RETENTION / 1000) .. ')')
      end
    elseif name == 'collapse' then
      if not valid_option_key(value) then
        return fail('collapse key must be 1-128 printable ASCII characters')
      end
      collapse = value
    else
      return fail('unknown option ' .. name .. '; ' .. usage)
    end
    i = i + 2
  end
  local now = now_ms()
  local idem_key = nil
  if idem then
    idem_key = option_key('idem', uid, idem)
    local prior = redis.call('GET', idem_key)
    if prior then return prior end
  end
  local gone = key('gone', uid)
  local replaced = nil
  local collapse_key = nil
  if collapse then
    collapse_key = option_key('collapse', uid, collapse)
    local prev = redis.call('GET', collapse_key)
    if prev then
      local cursor = redis.call('GET', key('cursor', uid))
      local unread = not cursor or id_cmp(prev, cursor) > 0
      local held = #redis.call('XRANGE', inbox, prev, prev) == 1
      if unread and held and not withdrawn(gone, prev) then
        redis.call('ZADD', gone, id_ms(prev), prev)
        redis.call('PEXPIRE', gone, RETENTION)
        replaced = prev
      end
    end
  end
  local fields = {'d', payload}
  if ttl then
    table.insert(fields, 'x')
    table.insert(fields, ms_text(now + ttl * 1000))
  end
  local id = redis.call('XADD', inbox, '*', unpack(fields))
  trim(inbox, uid, now)
  redis.call('PEXPIRE', inbox, RETENTION)
  -- Tombstones older than every retained entry mean nothing any more.
  local first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)[1]
  if first and redis.call('EXISTS', gone) == 1 then
    redis.call('ZREMRANGEBYSCORE', gone, '-inf', '(' .. id_ms(first[1]))
  end
  if collapse_key then redis.call('SET', collapse_key, id, 'PX', RETENTION) end
  if idem_key then redis.call('SET', idem_key, id, 'PX', IDEM_WINDOW) end
  local meta = id
  if replaced then meta = id .. ' ' .. replaced end
  publish_meta(uid, meta, payload)
  return id
end

-- herald_open: where a replay starts, and its first page.
-- KEYS[1] inbox  KEYS[2] cursor  KEYS[3] gone  KEYS[4] trimmed
-- ARGV[1] after ('' = none)  ARGV[2] after the cursor too (0/1)  ARGV[3] count unread (0/1)
-- ARGV[4] page size
-- Returns {start or '', trimmed (0/1), unread (-1 when not counted), next, id1, data1, ...}.
local function open(keys, args)
  local inbox, cursor_key, gone, trimmed_key = keys[1], keys[2], keys[3], keys[4]
  local after, with_cursor, with_unread = args[1], args[2] == '1', args[3] == '1'
  local count = tonumber(args[4])
  if (after ~= '' and not valid_id(after)) or not count or count < 1 then
    return fail('usage: herald_open')
  end
  local now = now_ms()
  local cursor = redis.call('GET', cursor_key) or ''
  local start = after
  if with_cursor and cursor ~= '' and (start == '' or id_cmp(cursor, start) > 0) then
    start = cursor
  end
  local trimmed = 0
  if start ~= '' and trimmed_after(inbox, trimmed_key, start, now) then trimmed = 1 end
  local unread = -1
  if with_unread then unread = count_after(inbox, gone, cursor, now) end
  local out = {start, trimmed, unread}
  for _, v in ipairs(page(inbox, gone, start, count, now)) do table.insert(out, v) end
  return out
end

-- herald_page: the next page of a replay.
-- KEYS[1] inbox  KEYS[2] gone   ARGV[1] after   ARGV[2] page size
-- Returns {next, id1, data1, ...}.
local function next_page(keys, args)
  local count = tonumber(args[2])
  if not valid_id(args[1]) or not count or count < 1 then return fail('usage: herald_page') end
  return page(keys[1], keys[2], args[1], count, now_ms())
end

-- herald_ack: moves the read cursor forward, at most to the newest entry the inbox holds,
-- and tells the user's sessions on every node.
-- KEYS[1] cursor  KEYS[2] inbox
-- ARGV[1] id  ARGV[2] session id of the reader ('' for the API)
-- Returns {1 when the cursor moved else 0, the cursor or ''}.
local function ack(keys, args)
  local cursor_key, inbox = keys[1], keys[2]
  local id, session = args[1], args[2] or ''
  if not valid_id(id) then return fail('usage: herald_ack') end
  local uid = user_of(inbox)
  if not uid then return fail('bad inbox key') end
  local cur = redis.call('GET', cursor_key)
  local newest = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)[1]
  if not newest then return {0, cur or ''} end
  local target = id
  if id_cmp(target, newest[1]) > 0 then target = newest[1] end
  if cur and id_cmp(cur, target) >= 0 then return {0, cur} end
  redis.call('SET', cursor_key, target, 'PX', RETENTION)
  local meta = 'read ' .. target
  if session ~= '' then meta = meta .. ' ' .. session end
  publish_meta(uid, meta, '')
  return {1, target}
end

-- herald_retract: withdraws an entry (replay and reads skip it from now on) and tells the
-- user's sessions on every node.
-- KEYS[1] inbox  KEYS[2] gone   ARGV[1] id
-- Returns 1 when the entry was withdrawn, 0 when the inbox holds no such entry.
local function retract(keys, args)
  local inbox, gone, id = keys[1], keys[2], args[1]
  if not valid_id(id) then return fail('usage: herald_retract') end
  local uid = user_of(inbox)
  if not uid then return fail('bad inbox key') end
  if #redis.call('XRANGE', inbox, id, id) == 0 or withdrawn(gone, id) then return 0 end
  redis.call('ZADD', gone, id_ms(id), id)
  redis.call('PEXPIRE', gone, RETENTION)
  publish_meta(uid, 'retract ' .. id, '')
  return 1
end

-- herald_config: the settings this library was loaded with, so a node can tell whether
-- another deployment with other settings shares this Redis.
-- Returns {version, prefix, max len, retention ms, max bytes, idempotency window ms}.
local function config()
  return {VERSION, PREFIX, MAXLEN, RETENTION, MAX_BYTES, IDEM_WINDOW}
end

redis.register_function('herald_notify', notify)
redis.register_function{function_name = 'herald_open', callback = open, flags = {'no-writes'}}
redis.register_function{function_name = 'herald_page', callback = next_page, flags = {'no-writes'}}
redis.register_function('herald_ack', ack)
redis.register_function('herald_retract', retract)
redis.register_function{function_name = 'herald_config', callback = config, flags = {'no-writes'}}
