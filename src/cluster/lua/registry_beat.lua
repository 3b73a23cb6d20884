-- registry_beat: a lease's entry in the registry of leases (member lease id, score = expiry
-- ms on the Redis clock). Readers treat a lease as live while its score is in the future;
-- reapers visit leases whose score has passed. Entries dead longer than the reap window
-- are pruned (their sets have expired by then). One write per node per heartbeat.
-- KEYS[1] <p>:nodes
-- ARGV[1..5] prelude   ARGV[6] lease id   ARGV[7] reap window (ms)   ARGV[8] '1' to retire
-- the lease (clean stop, or replaced by a new lease): it is dead from now on
local keep = tonumber(ARGV[7])
if ARGV[8] == '1' then
  redis.call('ZADD', KEYS[1], 'XX', ms(now - 1), ARGV[6])
else
  redis.call('ZADD', KEYS[1], exp, ARGV[6])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms(now - ttl - keep))
extend(KEYS[1], ttl + keep)
return now
