-- presence_add: records a new session and emits `online` for the user's first one.
-- KEYS[1] <p>:users  KEYS[2] <p>:presence:<uid>  KEYS[3] <p>:node:<id>
-- KEYS[4] <p>:events  KEYS[5] <p>:offline-pending
-- ARGV[1..4] prelude   ARGV[5] uid   ARGV[6] member   ARGV[7] first_of_user (0/1)
-- ARGV[8] node id
local uid = ARGV[5]
local known = settle_due(KEYS[1], KEYS[4], KEYS[5], uid)
redis.call('ZADD', KEYS[2], exp, ARGV[6])
extend(KEYS[2])
redis.call('ZADD', KEYS[1], 'GT', ms(now + ttl + grace), uid)
extend(KEYS[1], ttl + grace)
if not known then emit(KEYS[4], 'online', uid, '', ARGV[8]) end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', 1)
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[3], 'users', 1) end
end
return 1
