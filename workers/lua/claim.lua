-- Take up to N messages off a stage queue for one worker to run in a batch, recording them
-- as claimed (with the time) in the same step, so none is ever off the queue unrecorded.
-- KEYS: queue, claimed
--   queue: kombu's list for the stage queue (consumers pop from the right);
--   claimed: the queue's sorted set of claimed messages
-- ARGV: [1] how many at most, [2] now (epoch seconds), [3] ttl_s
-- Returns the messages taken.
local taken = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not taken then return {} end
for _, message in ipairs(taken) do
  redis.call('ZADD', KEYS[2], ARGV[2], message)
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return taken
