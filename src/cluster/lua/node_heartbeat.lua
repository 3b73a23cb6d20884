-- node_heartbeat: refreshes this node's record and its membership in the live-node set.
-- KEYS[1] <p>:nodes  KEYS[2] <p>:node:<id>
-- ARGV[1..4] prelude   ARGV[5] node id   ARGV[6] connections   ARGV[7] users
-- ARGV[8] started_at (Unix ms)   ARGV[9] listen address
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms(now))
redis.call('ZADD', KEYS[1], exp, ARGV[5])
extend(KEYS[1])
redis.call('HSET', KEYS[2], 'connections', ARGV[6], 'users', ARGV[7], 'started_at', ARGV[8], 'listen', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ttl)
return now
