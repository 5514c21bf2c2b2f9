-- Create a run and register its root items in one step, so the run is never seen half-made.
-- Idempotent for a run id: a run that exists already is left as it is (two beats firing the
-- same schedule slot, or a trigger retried, create one run).
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
--       batchmaps, bmof, bmqueue, fanned
-- ARGV: [1] run id, [2] pipeline, [3] params JSON, [4] now (epoch seconds), [5] ttl_s,
--       [6] root stage, [7] holds (1 when the roots come next as a batch map, whose
--       creation takes the hold over; else 0), then pairs: [8] item id, [9] payload JSON, ...
-- Returns 1 when the run was created, 0 when it existed already. A run with no new root
-- item finishes at once.
local run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
  batchmaps, bmof, bmqueue, fanned = unpack(KEYS)
-- INCLUDE: _end_run
local now, ttl_s, root_stage = ARGV[4], tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', run) == 1 then return 0 end
redis.call('HSET', run, 'run_id', ARGV[1], 'pipeline', ARGV[2], 'params', ARGV[3],
  'status', 'running', 'created_at', now, 'progress_at', now, 'pending', 0)
local new = 0
for i = 8, #ARGV, 2 do
  redis.call('RPUSH', roots, ARGV[i])
  if redis.call('HSETNX', items, ARGV[i], 'p') == 1 then
    redis.call('HSET', payloads, ARGV[i], ARGV[i + 1])
    new = new + 1
  end
end
local holds = tonumber(ARGV[7])
redis.call('HSET', run, 'pending', new + holds)
redis.call('HSET', counts, root_stage .. ':enqueued', new)
if new + holds == 0 then
  end_run(run, failed, done, now, ttl_s)  -- nothing to wait for: 'succeeded'
else
  refresh_run(ttl_s)
end
return 1
