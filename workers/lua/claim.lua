-- Take up to N messages off a stage queue for one worker to run in a batch, recording them
-- as claimed (with the time) in the same step, so none is ever off the queue unrecorded.
-- KEYS: queue, claimed
--   queue: kombu's list for the stage queue (consumers pop from the right);
--   claimed: the queue's sorted set of claimed messages
-- ARGV: [1] how many at most, [2] now (epoch seconds), [3] ttl_s, [4] share: the threads
--       that compete for this queue; a claim takes no more than its fair share of what waits
--       (queue length / share), so one thread never hoards a short queue while others idle
-- Returns the messages taken.
local count = math.min(tonumber(ARGV[1]),
  math.floor(redis.call('LLEN', KEYS[1]) / math.max(1, tonumber(ARGV[4]))))
if count < 1 then return {} end
local taken = redis.call('RPOP', KEYS[1], count)
if not taken then return {} end
for _, message in ipairs(taken) do
  redis.call('ZADD', KEYS[2], ARGV[2], message)
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return taken
