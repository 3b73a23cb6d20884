-- presence_stats: connections and users over live nodes. Returns
-- {users, id1, connections1, users1, id2, ...}; users in their offline grace are not counted.
-- KEYS[1] <p>:nodes  KEYS[2] <p>:users
-- ARGV[1..4] prelude   ARGV[5] node key prefix `<p>:node:`
-- It builds each live node's key from ARGV[5], so it assumes one Redis instance.
local out = { redis.call('ZCOUNT', KEYS[2], '(' .. ms(now + grace), '+inf') }
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms(now), '+inf')) do
  local h = redis.call('HMGET', ARGV[5] .. id, 'connections', 'users')
  table.insert(out, id)
  table.insert(out, tonumber(h[1]) or 0)
  table.insert(out, tonumber(h[2]) or 0)
end
return out
