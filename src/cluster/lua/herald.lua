#!lua name=herald
-- The herald Functions library, loaded by every node with FUNCTION LOAD REPLACE at start-up
-- and after Redis restarts. __MAX_LEN__ and __RETENTION_MS__ are replaced with the node's
-- --inbox-max-len and --inbox-retention before loading.
--
-- herald_notify: stores a durable notification and publishes it, in one atomic step.
-- KEYS[1] <p>:inbox:<uid>
-- ARGV[1] payload
-- Returns the new entry's id. Appends to the user's capped stream, trims by age, refreshes
-- the expiry and publishes `\0<id>\0<payload>` on <p>:user:<uid>, a channel it derives
-- from the inbox key (so it assumes the user channel lives on the same Redis).
local MAXLEN = __MAX_LEN__
local RETENTION = __RETENTION_MS__
local function notify(keys, args)
  local inbox = keys[1]
  local payload = args[1]
  if not inbox or not payload then
    return redis.error_reply('usage: FCALL herald_notify 1 <prefix>:inbox:<user> <payload>')
  end
  local cut = string.find(inbox, ':inbox:', 1, true)
  if not cut then
    return redis.error_reply('key must be <prefix>:inbox:<user>')
  end
  local channel = string.sub(inbox, 1, cut - 1) .. ':user:' .. string.sub(inbox, cut + 7)
  local id = redis.call('XADD', inbox, 'MAXLEN', '~', MAXLEN, '*', 'd', payload)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', inbox, 'MINID', '~', string.format('%.0f', now - RETENTION))
  redis.call('PEXPIRE', inbox, RETENTION)
  redis.call('PUBLISH', channel, '\0' .. id .. '\0' .. payload)
  return id
end
redis.register_function('herald_notify', notify)
