-- registry_scan: the registry split in two: live leases and dead ones (at most ARGV[6] of
-- those, oldest first), judged on the Redis clock.
-- KEYS[1] <p>:nodes
-- ARGV[1..5] prelude   ARGV[6] most dead leases returned
-- Replies {n_live, live..., dead...}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms(now), '+inf')
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms(now), 'LIMIT', 0, tonumber(ARGV[6]))
local out = {#live}
for _, l in ipairs(live) do table.insert(out, l) end
for _, l in ipairs(dead) do table.insert(out, l) end
return out
