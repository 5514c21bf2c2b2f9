-- Take up to N messages off a stage queue for one worker to run in a batch, recording them
-- as claimed, with the time and the worker, in the same step: none is ever off the queue
-- unrecorded, and each is put back when its worker dies (restore_claimed.lua), never by age.
-- KEYS: queue, claimed, claimers, workers, worker_queues
--   queue: kombu's list for the stage queue (consumers pop from the right);
--   claimed: the queue's sorted set, claimed message -> claim time (server time);
--   claimers: the queue's hash, claimed message -> worker id;
--   workers: the workers index, worker id -> last heartbeat (server time);
--   worker_queues: the set of queues this worker claimed on (where to look when it dies)
-- ARGV: [1] how many at most, [2] worker id, [3] ttl_s, [4] share: the threads that compete
--       for this queue; a claim takes no more than its fair share of what waits (queue
--       length / share), so one thread never hoards a short queue while others idle
-- The claimer joins the workers index if it is not there yet (ZADD NX: a beat is not moved
-- back), so a process that claims and never beats is found dead all the same.
-- Returns the messages taken.
local count = math.min(tonumber(ARGV[1]),
  math.floor(redis.call('LLEN', KEYS[1]) / math.max(1, tonumber(ARGV[4]))))
if count < 1 then return {} end
local taken = redis.call('RPOP', KEYS[1], count)
if not taken then return {} end
local time = redis.call('TIME')
local now = string.format('%.6f', tonumber(time[1]) + tonumber(time[2]) / 1000000)
for _, message in ipairs(taken) do
  redis.call('ZADD', KEYS[2], now, message)
  redis.call('HSET', KEYS[3], message, ARGV[2])
end
redis.call('ZADD', KEYS[4], 'NX', now, ARGV[2])
redis.call('SADD', KEYS[5], KEYS[1])
for i = 2, 5 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3])) end
return taken
