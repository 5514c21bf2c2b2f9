-- Take the delayed messages that are due, atomically, so two movers never publish one twice.
-- KEYS: delayed
--   delayed: the sorted set of encoded deliveries, scored by due time
-- ARGV: [1] now (epoch seconds), [2] at most this many
-- Returns the members taken.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
