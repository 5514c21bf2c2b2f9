-- Take one of a limit's concurrency slots for a holder, leased until now + lease_s (server
-- time). Expired leases are dropped first, so a worker killed while holding a slot frees it
-- when its lease ends. A holder that has a live slot already keeps it, its lease renewed
-- (a redelivered task does not take a second slot).
-- KEYS: slots, keys
--   slots: sorted set, holder id -> lease expiry (epoch seconds)
--   keys: sorted set, the template's keys in use (_limit_key_touch.lua)
-- ARGV: [1] holder id, [2] lease_s, [3] number of slots, [4] the key of a limit used per key
--       ('' or none: not per key), [5] seconds a key stays in use after its last call
-- Returns 1 when the holder has a slot, 0 when every slot is taken.
-- INCLUDE: _limit_key_touch
local slots = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
touch_key(KEYS[2], ARGV[4], now, math.max(tonumber(ARGV[5] or 0), tonumber(ARGV[2])))
redis.call('ZREMRANGEBYSCORE', slots, '-inf', string.format('%.6f', now))
if not redis.call('ZSCORE', slots, ARGV[1])
    and redis.call('ZCARD', slots) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', slots, string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
-- The set matters while its longest lease lasts; it expires a second after that.
local last = redis.call('ZRANGE', slots, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', slots, math.ceil((tonumber(last[2]) - now) * 1000) + 1000)
return 1
