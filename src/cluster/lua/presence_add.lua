-- presence_add: records a new session in its user's presence hash; `online` for the user's
-- first session anywhere.
-- KEYS[1] <p>:presence:{<uid>}   (KEYS[2] <p>:events  KEYS[3] <p>:online:{<p>:events}, inline only)
-- ARGV[1..5] prelude   ARGV[6] uid   ARGV[7] session id   ARGV[8] '<lease>|<connected_at>'
-- ARGV[9] node id   ARGV[10] key TTL (ms)
local key, uid = KEYS[1], ARGV[6]
local state = redis.call('HGET', key, '=')
redis.call('HSET', key, ARGV[7], ARGV[8])
come_online(key, uid, state, ARGV[9])
extend(key, tonumber(ARGV[10]))
return done(1)
