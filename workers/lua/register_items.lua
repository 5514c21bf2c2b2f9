-- Register child items before they are published. An id seen before is not counted again,
-- so a parent that is delivered twice publishes its children twice but registers them once.
-- The payload is kept until the item is terminal, so a lost message can be published again.
-- KEYS: run, counts, items, payloads
-- ARGV: [1] stage, [2] ttl_s, [3] now, then pairs: [4] item id, [5] payload JSON, ...
-- Returns the number of ids that were new. Error NORUN: the run is unknown or expired.
local run, counts, items, payloads = unpack(KEYS)
local stage, ttl_s, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', run) == 0 then
  return redis.error_reply('NORUN the run is unknown or expired')
end
local new = 0
for i = 4, #ARGV, 2 do
  if redis.call('HSETNX', items, ARGV[i], 'p') == 1 then
    redis.call('HSET', payloads, ARGV[i], ARGV[i + 1])
    new = new + 1
  end
end
if new > 0 then
  -- Raised before the children exist on the queue: the run cannot reach zero under them.
  redis.call('HINCRBY', run, 'pending', new)
  redis.call('HINCRBY', counts, stage .. ':enqueued', new)
end
redis.call('HSET', run, 'progress_at', now)
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl_s) end
return new
