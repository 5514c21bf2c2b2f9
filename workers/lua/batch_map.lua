-- Create a batch map: register all its items as pending (counted enqueued), but give only the
-- first batch a payload to publish; the others wait in bmqueue until a batch completes. The
-- map holds one pending token of the run until its last kill-switch check (batch_settle.lua),
-- so the run cannot finish before the switch had its say. Idempotent per map id: a parent
-- delivered twice creates it once (what the first call released is on the queue, or in the
-- payloads hash for the reaper).
-- KEYS: run, counts, items, payloads, roots, batchmaps, bmof, bmqueue
-- ARGV: [1] map id, [2] task name, [3] stage, [4] batch size, [5] kill switch spec JSON or
--       '', [6] per-item check 0/1, [7] as roots 0/1 (push ids to the roots list and give
--       back the run's creation hold), [8] now, [9] ttl_s, then pairs: [10] item id,
--       [11] payload JSON, ...
-- Returns the first batch to publish: {id, payload, id, payload, ...} ({} if it existed).
-- Error NORUN: the run is unknown or expired.
local run, counts, items, payloads, roots, batchmaps, bmof, bmqueue = unpack(KEYS)
-- INCLUDE: _bmqueue
local map_id, stage, size, as_roots = ARGV[1], ARGV[3], tonumber(ARGV[4]), ARGV[7] == '1'
if redis.call('EXISTS', run) == 0 then
  return redis.error_reply('NORUN the run is unknown or expired')
end
if redis.call('HEXISTS', batchmaps, map_id) == 1 then return {} end
local n = 0
local first = {}
for i = 10, #ARGV, 2 do
  local item, payload = ARGV[i], ARGV[i + 1]
  if as_roots then redis.call('RPUSH', roots, item) end
  if redis.call('HSETNX', items, item, 'p') == 1 then
    redis.call('HSET', bmof, item, map_id)
    if n < size then
      redis.call('HSET', payloads, item, payload)
      first[#first + 1] = item
      first[#first + 1] = payload
    else
      redis.call('HSET', bmqueue, map_id .. ':' .. n, queued_entry(item, payload))
    end
    n = n + 1
  end
end
local state = {task = ARGV[2], stage = stage, size = size, total = n,
  released = math.min(n, size), done = 0, s = 0, f = 0, k = 0, c = 0,
  switch = ARGV[5], per_item = tonumber(ARGV[6]), deciding = 0, complete = 0}
-- An empty map has nothing to wait for: no token.
if n == 0 then state.complete = 1 end
redis.call('HSET', batchmaps, map_id, cjson.encode(state))
local held = n
if n > 0 then held = held + 1 end
if as_roots then held = held - 1 end  -- the creation hold becomes the map's token
redis.call('HINCRBY', run, 'pending', held)
redis.call('HINCRBY', counts, stage .. ':enqueued', n)
redis.call('HSET', run, 'progress_at', ARGV[8])
local ttl_s = tonumber(ARGV[9])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl_s) end
return first
