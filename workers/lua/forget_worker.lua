-- Forget a dead worker once what it held is back on the queues: its entry in the workers
-- index, its held set and its set of claimed-on queues. Not if it beat again meanwhile (a worker that was only slow).
-- KEYS: workers, held, queues
--   workers: the workers index, worker id -> last heartbeat;
--   held: that worker's set of delivery tags;
--   queues: the queues it claimed on
-- ARGV: [1] worker id, [2] heartbeat_ttl_s
-- Returns 1 when forgotten, 0 when it is alive again (or already forgotten).
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not beat or tonumber(beat) >= now - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
