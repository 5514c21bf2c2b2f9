-- Create a run and register its root items in one step, so the run is never seen half-made.
-- Idempotent for a run id: a run that exists already is left as it is (two beats firing the
-- same schedule slot, or a trigger retried, create one run).
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots
-- ARGV: [1] run id, [2] pipeline, [3] params JSON, [4] now (epoch seconds), [5] ttl_s,
--       [6] root stage, [7] holds (1 when the roots come next as a batch map, whose
--       creation takes the hold over; else 0), then pairs: [8] item id, [9] payload JSON, ...
-- Returns 1 when the run was created, 0 when it existed already. A run with no new root
-- item finishes at once.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'pipeline', ARGV[2], 'params', ARGV[3],
  'status', 'running', 'created_at', ARGV[4], 'progress_at', ARGV[4], 'pending', 0)
local new = 0
for i = 8, #ARGV, 2 do
  redis.call('RPUSH', KEYS[9], ARGV[i])
  if redis.call('HSETNX', KEYS[3], ARGV[i], 'p') == 1 then
    redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
    new = new + 1
  end
end
local holds = tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'pending', new + holds)
redis.call('HSET', KEYS[2], ARGV[6] .. ':enqueued', new)
if new + holds == 0 then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[4])
  redis.call('RPUSH', KEYS[5], 'succeeded')
end
for i = 1, 9 do redis.call('EXPIRE', KEYS[i], ttl) end
return 1
