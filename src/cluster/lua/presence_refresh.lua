-- presence_refresh: writes every session one node holds for one user under the node's new
-- lease, after it took one (its old lease expired while it was away, Redis lost its data,
-- the subscription was rebuilt after a failover, or a presence write failed): the sessions
-- are written again, the key's TTL is extended, and the user is marked online (with
-- `online` if Redis had lost them). The old lease's copies are dropped by its reaper.
-- KEYS[1] <p>:presence:{<uid>}   (KEYS[2..3] events stream and online index, inline only)
-- ARGV[1..5] prelude   ARGV[6] uid   ARGV[7] node id   ARGV[8] key TTL (ms)
-- ARGV[9..] session id, '<lease>|<connected_at>' pairs
local key, uid = KEYS[1], ARGV[6]
local state = redis.call('HGET', key, '=')
for i = 9, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
if #ARGV >= 9 then come_online(key, uid, state, ARGV[7]) end
extend(key, tonumber(ARGV[8]))
return done(1)
