-- inbox_ack: moves a user's read cursor forward only, and refreshes its expiry.
-- Returns 1 when the cursor moved, 0 when it already was at or past the id.
-- KEYS[1] <p>:cursor:{<uid>}
-- ARGV[1] inbox id <ms>-<seq>   ARGV[2] cursor TTL (ms)
local function parse(id)
  local a, b = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(a), tonumber(b)
end
local nm, ns = parse(ARGV[1])
if not nm then return redis.error_reply('bad id') end
local cur = redis.call('GET', KEYS[1])
if cur then
  local cm, cs = parse(cur)
  if cm and (cm > nm or (cm == nm and cs >= ns)) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
