-- lease_work: what a reaper has to do for one lease: users whose pending offline is due
-- and, when the lease is dead, a batch of its users to drop. The node reaping a dead lease
-- takes a short claim first, so that live nodes do not all repeat the same work; the work
-- itself is idempotent, so a claim that lapses mid-way costs only repetition.
-- KEYS[1] <p>:lease:{<lease>}   KEYS[2] <p>:lease:{<lease>}:users
-- KEYS[3] <p>:lease:{<lease>}:pending   KEYS[4] <p>:lease:{<lease>}:reaper
-- ARGV[1..5] prelude   ARGV[6] '1' when the lease is dead   ARGV[7] reaper's node id
-- ARGV[8] batch size   ARGV[9] claim (ms)
-- Replies {state, n_due, due uid..., dropped uid...}: state 'idle' (nothing left of a dead
-- lease), 'claimed' (another node is reaping it) or 'work'.
local dead = ARGV[6] == '1'
local batch = tonumber(ARGV[8])
if dead then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= ARGV[7] then return {'claimed', 0} end
  redis.call('SET', KEYS[4], ARGV[7], 'PX', tonumber(ARGV[9]))
end
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ms(now), 'LIMIT', 0, batch)
local out = {'work', #due}
for _, u in ipairs(due) do table.insert(out, u) end
if dead then
  local users = redis.call('SRANDMEMBER', KEYS[2], batch)
  for _, u in ipairs(users) do table.insert(out, u) end
  if #due == 0 and #users == 0 and redis.call('ZCARD', KEYS[3]) == 0 then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
    return {'idle', 0}
  end
end
return out
