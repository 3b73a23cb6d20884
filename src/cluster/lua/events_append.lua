-- events_append: applies what a presence script handed back (Redis Cluster, where the
-- events stream and the online index live in another slot than the user's keys): events
-- are appended and published, marks only move the user's entry in the online index.
-- KEYS[1] <p>:events   KEYS[2] <p>:online:{<p>:events}
-- ARGV[1..5] prelude   ARGV[6..] JSON: events {type, user, ts, reason?, node?} or marks
-- {mark = 'grace' | 'back', user, ts}
for i = 6, #ARGV do
  local ev = cjson.decode(ARGV[i])
  if ev.mark == 'grace' then
    redis.call('ZADD', KEYS[2], '-1', ev.user)
  elseif ev.mark == 'back' then
    redis.call('ZADD', KEYS[2], ms(ev.ts), ev.user)
  else
    append(KEYS[1], KEYS[2], ev)
  end
end
return #ARGV - 5
