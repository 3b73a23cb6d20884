-- presence_remove: removes a closed session. When it was the user's last session anywhere,
-- the offline grace window starts: the reply is 2 and the node records the user in its
-- lease's pending set, whose reaper settles it (presence_settle) once the window is over.
-- KEYS[1] <p>:presence:{<uid>}   (KEYS[2..3] events stream and online index, inline only)
-- ARGV[1..5] prelude   ARGV[6] uid   ARGV[7] session id   ARGV[8] reason (closed, kicked,
-- drained)   ARGV[9] how long the key must outlive a pending offline (ms)
-- Replies {0} nothing removed, {1} removed, {2, due} removed and offline pending until due.
local key = KEYS[1]
if redis.call('HDEL', key, ARGV[7]) == 0 then return done(0) end
if sessions_left(key) == 0 and redis.call('HGET', key, '=') == 'on' then
  local due = ms(now + grace)
  redis.call('HSET', key, '=', 'off|' .. due .. '|' .. ARGV[8])
  extend(key, grace + tonumber(ARGV[9]))
  mark(ARGV[6], 'grace')
  return done(2, due)
end
return done(1)
