-- Create a run and register its root items in one step, so the run is never seen half-made.
-- KEYS: [1] run hash, [2] counts hash, [3] items hash, [4] failed hash, [5] done list,
--       [6] payloads hash, [7] results hash, [8] loops hash, [9] roots list,
--       [10] runs index (sorted set)
-- ARGV: [1] run id, [2] pipeline, [3] params JSON, [4] now (epoch seconds), [5] ttl_s,
--       [6] root stage, then pairs: [7] item id, [8] item payload JSON, ...
-- Returns the number of root items registered; a run with none finishes at once.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('RUNEXISTS run ' .. ARGV[1] .. ' already exists')
end
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'pipeline', ARGV[2], 'params', ARGV[3],
  'status', 'running', 'created_at', ARGV[4], 'progress_at', ARGV[4], 'pending', 0)
local new = 0
for i = 7, #ARGV, 2 do
  redis.call('RPUSH', KEYS[9], ARGV[i])
  if redis.call('HSETNX', KEYS[3], ARGV[i], 'p') == 1 then
    redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
    new = new + 1
  end
end
redis.call('HSET', KEYS[1], 'pending', new)
redis.call('HSET', KEYS[2], ARGV[6] .. ':enqueued', new)
if new == 0 then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[4])
  redis.call('RPUSH', KEYS[5], 'succeeded')
end
redis.call('ZADD', KEYS[10], ARGV[4], ARGV[1])
-- Runs older than the TTL have expired: drop them from the index too.
redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', tonumber(ARGV[4]) - ttl)
for i = 1, 10 do redis.call('EXPIRE', KEYS[i], ttl) end
return new
