-- inbox_gap: what replay needs to tell whether entries after `since` were trimmed.
-- Returns {first retained id or '' when the stream does not exist,
--          1 when entries were ever trimmed (entries-added > length; assumed on Redis < 7),
--          now in Redis-server ms}.
-- KEYS[1] <p>:inbox:{<uid>}
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', 0, now} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local len, added = nil, nil
for i = 1, #info, 2 do
  if info[i] == 'length' then len = info[i + 1] end
  if info[i] == 'entries-added' then added = info[i + 1] end
end
local trimmed = 1
if len and added and added <= len then trimmed = 0 end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_id = ''
if first[1] then first_id = first[1][1] end
return {first_id, trimmed, now}
