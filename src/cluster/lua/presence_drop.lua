-- presence_drop: removes every session a dead lease (a node that crashed, froze or lost its
-- lease) holds for one user. When none is left the offline grace window starts, with reason
-- `expired`, exactly as presence_remove starts it for a closed session.
-- KEYS[1] <p>:presence:{<uid>}   (KEYS[2..3] events stream and online index, inline only)
-- ARGV[1..5] prelude   ARGV[6] uid   ARGV[7] dead lease id   ARGV[8] how long the key must
-- outlive a pending offline (ms)
-- Replies {n} sessions removed, or {2, due} when the offline is now pending.
local key = KEYS[1]
local head = ARGV[7] .. '|'
local all = redis.call('HGETALL', key)
local removed = 0
for i = 1, #all, 2 do
  if all[i] ~= '=' and string.sub(all[i + 1], 1, #head) == head then
    redis.call('HDEL', key, all[i])
    removed = removed + 1
  end
end
if sessions_left(key) == 0 and redis.call('HGET', key, '=') == 'on' then
  local due = ms(now + grace)
  redis.call('HSET', key, '=', 'off|' .. due .. '|expired')
  extend(key, grace + tonumber(ARGV[8]))
  mark(ARGV[6], 'grace')
  return done(2, due)
end
return done(removed == 0 and 0 or 1)
