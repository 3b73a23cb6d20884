-- node_deregister: removes this node's record on a clean stop.
-- KEYS[1] <p>:nodes  KEYS[2] <p>:node:<id>
-- ARGV[1..4] prelude   ARGV[5] node id
redis.call('ZREM', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2])
return 1
