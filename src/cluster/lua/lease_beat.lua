-- lease_beat: the heartbeat of a node's lease. The lease hash lives exactly --presence-ttl
-- after the last beat (its existence is the node's liveness, on the Redis clock); the
-- lease's user set and pending set live a reap window longer, so that a reaper can still
-- read them after the lease died. Constant work however many sessions the node holds.
-- KEYS[1] <p>:lease:{<lease>}   KEYS[2] <p>:lease:{<lease>}:users
-- KEYS[3] <p>:lease:{<lease>}:pending
-- ARGV[1..5] prelude   ARGV[6] '1' to create the lease, '0' to extend it only
-- ARGV[7] node id   ARGV[8] connections   ARGV[9] users   ARGV[10] started_at (Unix ms)
-- ARGV[11] listen address   ARGV[12] reap window (ms)
-- Replies {now} or {0} when the lease is gone (expired while the node was away, or Redis
-- lost it): the node must take a new lease and write its sessions again.
if ARGV[6] ~= '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
redis.call('HSET', KEYS[1], 'node', ARGV[7], 'connections', ARGV[8], 'users', ARGV[9],
  'started_at', ARGV[10], 'listen', ARGV[11])
redis.call('PEXPIRE', KEYS[1], ttl)
local keep = ttl + tonumber(ARGV[12])
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('PEXPIRE', KEYS[3], keep)
return {now}
