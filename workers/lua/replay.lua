-- Put failed items of a run back to pending, so they can be published again into the same
-- run: the run reopens (status running, no finish time, an empty done list) and will finish
-- again when they are terminal. An item that is not failed (any more) is left alone.
-- KEYS: run, counts, items, failed, done, payloads, tries
-- ARGV: [1] now, [2] ttl_s, then pairs: [3] item id, [4] payload JSON, ...
-- Returns the ids put back.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NORUN the run is unknown or expired') end
if status == 'killed' or status == 'cancelled' then
  return redis.error_reply('STOPPED the run was ' .. status)
end
local replayed = {}
for i = 3, #ARGV, 2 do
  local item = ARGV[i]
  if redis.call('HGET', KEYS[3], item) == 'f' then
    local failure = cjson.decode(redis.call('HGET', KEYS[4], item))
    redis.call('HSET', KEYS[3], item, 'p')
    redis.call('HSET', KEYS[6], item, ARGV[i + 1])
    redis.call('HDEL', KEYS[4], item)
    redis.call('HDEL', KEYS[7], item, item .. '@first')
    redis.call('HINCRBY', KEYS[2], failure['stage'] .. ':failed', -1)
    replayed[#replayed + 1] = item
  end
end
if #replayed > 0 then
  redis.call('HINCRBY', KEYS[1], 'pending', #replayed)
  redis.call('HSET', KEYS[1], 'status', 'running', 'progress_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'finished_at')
  redis.call('DEL', KEYS[5])
  local ttl = tonumber(ARGV[2])
  for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return replayed
