-- Move a looping item from iteration k to k+1, exactly once, keeping the new payload so
-- a lost message for k+1 can be published again. A duplicate of iteration k finds the loop
-- already past k and is told not to enqueue k+1 a second time.
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots
-- ARGV: [1] item id, [2] stage, [3] k (the iteration that just ran), [4] loop state JSON for
--       k+1: {"iteration": k+1, "payload": ...}, [5] now, [6] ttl_s
-- Returns 1 when advanced, 0 when the item is terminal or the loop is not at k.
if redis.call('HGET', KEYS[3], ARGV[1]) ~= 'p' then return 0 end
local loop = redis.call('HGET', KEYS[8], ARGV[1])
local current = 1
if loop then current = cjson.decode(loop)['iteration'] end
if current ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[8], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[8], tonumber(ARGV[6]))
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':iterations', 1)
redis.call('HSET', KEYS[1], 'progress_at', ARGV[5])
-- A long loop is progress too: keep the run's keys alive (see finish_item.lua).
local ttl = tonumber(ARGV[6])
if redis.call('TTL', KEYS[1]) < ttl / 2 then
  for i = 1, 9 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
