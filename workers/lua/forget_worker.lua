-- Forget a dead worker once what it held is back on the queues: its entry in the workers
-- index and its held set. Not if it beat again meanwhile (a worker that was only slow).
-- KEYS: workers, held
--   workers: the workers index, worker id -> last heartbeat;
--   held: that worker's set of delivery tags
-- ARGV: [1] worker id, [2] heartbeat_ttl_s
-- Returns 1 when forgotten, 0 when it is alive again (or already forgotten).
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not beat or tonumber(beat) >= now - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
