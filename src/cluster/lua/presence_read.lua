-- presence_read: every session field of a user's presence hash, as a flat
-- {session, '<lease>|<connected_at>', ...} list. The node keeps those of live leases.
-- KEYS[1] <p>:presence:{<uid>}
-- ARGV[1..5] prelude
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if all[i] ~= '=' then
    table.insert(out, all[i]); table.insert(out, all[i + 1])
  end
end
return out
