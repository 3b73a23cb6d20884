-- presence_touch: the heartbeat of a batch of users: refreshes their sessions' expiry,
-- prunes expired members, and re-asserts users Redis lost (emitting `online`).
-- KEYS[1] <p>:users  KEYS[2] <p>:events  KEYS[3] <p>:offline-pending
-- KEYS[4..] <p>:presence:<uid> for each user in the batch
-- ARGV[1..4] prelude   ARGV[5] node id
-- ARGV[6..] per user: uid, member count n, then n members
local i = 6
for k = 4, #KEYS do
  local uid = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', ms(now))
  for j = 1, n do redis.call('ZADD', KEYS[k], exp, ARGV[i + 1 + j]) end
  extend(KEYS[k])
  local known = settle_due(KEYS[1], KEYS[2], KEYS[3], uid)
  redis.call('ZADD', KEYS[1], 'GT', ms(now + ttl + grace), uid)
  if not known then emit(KEYS[2], 'online', uid, '', ARGV[5]) end
  i = i + 2 + n
end
extend(KEYS[1], ttl + grace)
return #KEYS - 3
