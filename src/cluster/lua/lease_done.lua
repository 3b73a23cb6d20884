-- lease_done: removes what a reaper finished from a lease's sets: settled pending users and
-- dropped users.
-- KEYS[1] <p>:lease:{<lease>}:users   KEYS[2] <p>:lease:{<lease>}:pending
-- ARGV[1..5] prelude   ARGV[6] n settled, then n settled uids, then dropped uids
local n = tonumber(ARGV[6])
for i = 7, 6 + n do redis.call('ZREM', KEYS[2], ARGV[i]) end
for i = 7 + n, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end
return 1
