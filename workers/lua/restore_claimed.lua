-- Put back on their queue the claimed messages no live worker will release: those of dead
-- workers, and (after a Redis restart) those claimed before the server started, whose
-- connections died with it. A live worker's claim is never put back for its age alone.
-- KEYS: claimed, claimers, queue
-- ARGV: [1] claimed before this time (server epoch seconds; 0: none by time),
--       [2..] the ids of dead workers
-- They go back at the consuming end, the first claimed first in line.
-- Returns how many were put back.
local before = tonumber(ARGV[1])
local dead = {}
for i = 2, #ARGV do dead[ARGV[i]] = true end
local claimed = redis.call('ZREVRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local back = 0
for i = 1, #claimed, 2 do
  local message = claimed[i]
  local owner = redis.call('HGET', KEYS[2], message)
  if tonumber(claimed[i + 1]) < before or (owner and dead[owner]) then
    redis.call('RPUSH', KEYS[3], message)
    redis.call('ZREM', KEYS[1], message)
    redis.call('HDEL', KEYS[2], message)
    back = back + 1
  end
end
return back
