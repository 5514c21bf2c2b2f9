-- One heartbeat of a worker: it is alive now (server time), and so is every message it holds.
-- kombu restores an unacknowledged message once its unacked_index score is older than the
-- visibility timeout; moving the score of each held one to now keeps a long task from
-- running twice while its worker lives (a lease renewal, as RQ extends a started job).
-- KEYS: workers, held, unacked_index
--   workers: the workers index, worker id -> last heartbeat;
--   held: this worker's set of delivery tags (broker.py's QoS writes it with kombu's entry);
--   unacked_index: kombu's sorted set, delivery tag -> delivery time
-- ARGV: [1] worker id, [2] ttl_s of the index and the held set, [3..] the delivery tags the
--       worker's open channels hold right now
-- Tags no longer in kombu's index (acknowledged, or restored by another worker) leave the
-- held set. Returns how many leases were renewed.
local time = redis.call('TIME')
local now = string.format('%.6f', tonumber(time[1]) + tonumber(time[2]) / 1000000)
local ttl_s = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl_s)
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[3], 'XX', 'CH', now, ARGV[i])
end
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[3], tag) then redis.call('SREM', KEYS[2], tag) end
end
redis.call('EXPIRE', KEYS[2], ttl_s)
return renewed
