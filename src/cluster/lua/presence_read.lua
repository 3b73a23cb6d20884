-- presence_read: a user's live sessions (members whose expiry is in the future).
-- KEYS[1] <p>:presence:<uid>
-- ARGV[1..4] prelude
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms(now), '+inf')
