-- presence_remove: removes a session at once; the user's last session anywhere starts the
-- offline grace window (the reaper emits `offline` when it runs out).
-- KEYS[1] <p>:users  KEYS[2] <p>:presence:<uid>  KEYS[3] <p>:node:<id>
-- KEYS[4] <p>:events  KEYS[5] <p>:offline-pending
-- ARGV[1..4] prelude   ARGV[5] uid   ARGV[6] member   ARGV[7] last_of_user (0/1)
-- ARGV[8] reason (closed, kicked, drained)
local uid = ARGV[5]
local removed = redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms(now))
if redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZSCORE', KEYS[1], uid) then
  redis.call('ZADD', KEYS[1], 'XX', ms(now + grace), uid)
  redis.call('HSET', KEYS[5], uid, ARGV[8])
  extend(KEYS[5], ttl + grace)
end
if removed == 1 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', -1)
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[3], 'users', -1) end
end
return removed
