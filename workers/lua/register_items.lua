-- Register child items before they are published. An id seen before is not counted again.
-- A fan-out is named by a digest of its parent and children: once published (`fanned`, set
-- by Items.published after the broker took the messages), a parent delivered again (its
-- worker died before it was acknowledged) registers nothing and publishes nothing, so no
-- second copy of a child that still waits on its queue runs beside the first.
-- The payload is kept until the item is terminal, so a lost message can be published again.
-- KEYS: run, counts, items, payloads, fanned
-- ARGV: [1] stage, [2] ttl_s, [3] now, [4] fan-out digest or '', then pairs: [5] item id,
--       [6] payload JSON, ...
-- Returns the number of ids that were new, or -1 when this fan-out was published already.
-- Error NORUN: the run is unknown or expired.
local run, counts, items, payloads, fanned = unpack(KEYS)
local stage, ttl_s, now, digest = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if redis.call('EXISTS', run) == 0 then
  return redis.error_reply('NORUN the run is unknown or expired')
end
if digest ~= '' and redis.call('SISMEMBER', fanned, digest) == 1 then return -1 end
local new = 0
for i = 5, #ARGV, 2 do
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
