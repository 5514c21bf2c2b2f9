-- Put back on their queue the claimed messages whose worker never released them (it died):
-- the counterpart of kombu's restore of unacked messages after the visibility timeout.
-- KEYS: claimed, queue
-- ARGV: [1] claimed before this time (epoch seconds)
-- Returns how many were put back.
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, message in ipairs(stale) do
  redis.call('RPUSH', KEYS[2], message)  -- the consuming end: they go first
  redis.call('ZREM', KEYS[1], message)
end
return #stale
