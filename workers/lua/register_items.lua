-- Register child items before they are published. An id seen before is not counted again,
-- so a parent that is delivered twice publishes its children twice but registers them once.
-- The payload is kept until the item is terminal, so a lost message can be published again.
-- KEYS: run, counts, items, payloads
-- ARGV: [1] stage, [2] ttl_s, [3] now, then pairs: [4] item id, [5] payload JSON, ...
-- Returns the number of ids that were new.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NORUN the run is unknown or expired')
end
local new = 0
for i = 4, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], 'p') == 1 then
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
    new = new + 1
  end
end
if new > 0 then
  -- Raised before the children exist on the queue: the run cannot reach zero under them.
  redis.call('HINCRBY', KEYS[1], 'pending', new)
  redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':enqueued', new)
end
redis.call('HSET', KEYS[1], 'progress_at', ARGV[3])
local ttl = tonumber(ARGV[2])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
return new
