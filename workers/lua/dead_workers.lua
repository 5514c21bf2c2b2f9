-- The workers whose last heartbeat is older than the heartbeat TTL (server time): dead.
-- KEYS: workers
--   workers: the workers index, worker id -> last heartbeat (server epoch seconds)
-- ARGV: [1] heartbeat_ttl_s
-- Returns their ids, the longest silent first.
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf',
  string.format('(%.6f', now - tonumber(ARGV[1])))
