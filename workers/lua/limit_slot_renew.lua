-- Extend a holder's lease to now + lease_s (server time), only while its lease is live: once it
-- has expired the slot may belong to someone else, and renewing would exceed the limit.
-- KEYS: slots
--   slots: sorted set, holder id -> lease expiry (epoch seconds)
-- ARGV: [1] holder id, [2] lease_s
-- Returns 1 when renewed, 0 when the holder has no live slot (it must acquire again).
local slots = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', slots, '-inf', string.format('%.6f', now))
if not redis.call('ZSCORE', slots, ARGV[1]) then return 0 end
redis.call('ZADD', slots, string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', slots, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', slots, math.ceil((tonumber(last[2]) - now) * 1000) + 1000)
return 1
