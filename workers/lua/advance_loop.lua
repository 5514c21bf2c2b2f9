-- Move a looping item from iteration k to k+1, exactly once, keeping the new payload so
-- a lost message for k+1 can be published again. A duplicate of iteration k finds the loop
-- already past k and is told not to enqueue k+1 a second time.
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
--       batchmaps, bmof, bmqueue, fanned
-- ARGV: [1] item id, [2] stage, [3] k (the iteration that just ran), [4] loop state JSON for
--       k+1: {"iteration": k+1, "payload": ...}, [5] now, [6] ttl_s
-- Returns 1 when advanced, 0 when the item is terminal or the loop is not at k.
local run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
  batchmaps, bmof, bmqueue, fanned = unpack(KEYS)
-- INCLUDE: _end_run
local item, stage, k, next_state = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local now, ttl_s = ARGV[5], tonumber(ARGV[6])
if redis.call('HGET', items, item) ~= 'p' then return 0 end
local loop = redis.call('HGET', loops, item)
local current = 1
if loop then current = cjson.decode(loop)['iteration'] end
if current ~= k then return 0 end
redis.call('HSET', loops, item, next_state)
redis.call('EXPIRE', loops, ttl_s)
redis.call('HINCRBY', counts, stage .. ':iterations', 1)
redis.call('HSET', run, 'progress_at', now)
-- A long loop is progress too: keep the run's keys alive (see finish_item.lua).
if redis.call('TTL', run) < ttl_s / 2 then refresh_run(ttl_s) end
return 1
