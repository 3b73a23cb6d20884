-- presence_reap: emits exactly one `offline` per user whose grace has run out and who has
-- no live session; atomic, so any number of nodes may run it concurrently.
-- KEYS[1] <p>:users  KEYS[2] <p>:events  KEYS[3] <p>:offline-pending
-- ARGV[1..4] prelude   ARGV[5] presence key prefix `<p>:presence:`   ARGV[6] batch limit
-- It builds each due user's presence key from ARGV[5], so it assumes one Redis instance.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms(now), 'LIMIT', 0, tonumber(ARGV[6]))
local n = 0
for _, uid in ipairs(due) do
  local pkey = ARGV[5] .. uid
  redis.call('ZREMRANGEBYSCORE', pkey, '-inf', ms(now))
  local best = redis.call('ZREVRANGE', pkey, 0, 0, 'WITHSCORES')
  if best[2] then
    redis.call('ZADD', KEYS[1], ms(tonumber(best[2]) + grace), uid)
  else
    redis.call('ZREM', KEYS[1], uid)
    emit(KEYS[2], 'offline', uid, redis.call('HGET', KEYS[3], uid) or 'expired', '')
    redis.call('HDEL', KEYS[3], uid)
    n = n + 1
  end
end
return n
