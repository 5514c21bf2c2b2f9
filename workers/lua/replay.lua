-- Put failed items of a run back to pending, so they can be published again into the same
-- run: the run reopens (status running, no finish time, an empty done list) and will finish
-- again when they are terminal. An item that is not failed (any more) is left alone.
-- KEYS: run, counts, items, failed, done, payloads, tries
-- ARGV: [1] now, [2] ttl_s, then pairs: [3] item id, [4] payload JSON, ...
-- Returns the ids put back. Errors: NORUN the run is unknown or expired; STOPPED the run was
-- killed or cancelled (its skipped items would stay skipped).
local run, counts, items, failed, done, payloads, tries = unpack(KEYS)
local now, ttl_s = ARGV[1], tonumber(ARGV[2])
local status = redis.call('HGET', run, 'status')
if not status then return redis.error_reply('NORUN the run is unknown or expired') end
if status == 'killed' or status == 'cancelled' then
  return redis.error_reply('STOPPED the run was ' .. status)
end
local replayed = {}
for i = 3, #ARGV, 2 do
  local item = ARGV[i]
  if redis.call('HGET', items, item) == 'f' then
    local failure = cjson.decode(redis.call('HGET', failed, item))
    redis.call('HSET', items, item, 'p')
    redis.call('HSET', payloads, item, ARGV[i + 1])
    redis.call('HDEL', failed, item)
    redis.call('HDEL', tries, item, item .. '@first')
    redis.call('HINCRBY', counts, failure['stage'] .. ':failed', -1)
    replayed[#replayed + 1] = item
  end
end
if #replayed > 0 then
  redis.call('HINCRBY', run, 'pending', #replayed)
  redis.call('HSET', run, 'status', 'running', 'progress_at', now)
  redis.call('HDEL', run, 'finished_at')
  redis.call('DEL', done)
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl_s) end
end
return replayed
