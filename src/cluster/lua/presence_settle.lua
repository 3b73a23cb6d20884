-- presence_settle: emits the `offline` a user's pending state says is due, exactly once
-- however many reapers call it (the state and the decision are in one slot, one script).
-- KEYS[1] <p>:presence:{<uid>}   (KEYS[2..3] events stream and online index, inline only)
-- ARGV[1..5] prelude   ARGV[6] uid
-- Replies {1} offline emitted, {0} nothing to do (already settled, or back online),
-- {-1, due} not due yet.
local key, uid = KEYS[1], ARGV[6]
local state = redis.call('HGET', key, '=')
local due, reason = pending(state)
if not due then return done(0) end
if due > now then return done(-1, ms(due)) end
if sessions_left(key) > 0 then
  -- A node re-asserted a session without going through add (a lease rotation): the user
  -- never left.
  redis.call('HSET', key, '=', 'on')
  return done(0)
end
redis.call('DEL', key)
emit('offline', uid, reason, '')
return done(1)
