-- Take the delayed messages that are due, atomically, so two movers never publish one twice.
-- KEYS: delayed
--   delayed: the sorted set of encoded deliveries, scored by due time
-- ARGV: [1] now (epoch seconds), [2] at most this many
-- Returns the members taken.
local delayed = KEYS[1]
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', delayed, unpack(due)) end
return due
