-- lease_session: a node's own record of a session opening or closing, in its lease's slot:
-- the user set (which users a reaper must visit if the lease dies), the live counts of the
-- lease hash, and the pending set (users whose offline this node must settle).
-- KEYS[1] <p>:lease:{<lease>}   KEYS[2] <p>:lease:{<lease>}:users
-- KEYS[3] <p>:lease:{<lease>}:pending
-- ARGV[1..5] prelude   ARGV[6] uid   ARGV[7] +1 (open) or -1 (close)
-- ARGV[8] '1' when the node's first (open) or last (close) session of the user
-- ARGV[9] due ms of a pending offline, or ''   ARGV[10] reap window (ms)
local uid, delta, edge = ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
local keep = ttl + tonumber(ARGV[10])
if edge then
  if delta > 0 then redis.call('SADD', KEYS[2], uid) else redis.call('SREM', KEYS[2], uid) end
  extend(KEYS[2], keep)
end
if ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[9], uid)
  extend(KEYS[3], keep)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'connections', delta)
  if edge then redis.call('HINCRBY', KEYS[1], 'users', delta) end
end
return 1
