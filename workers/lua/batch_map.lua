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
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NORUN the run is unknown or expired')
end
if redis.call('HEXISTS', KEYS[6], ARGV[1]) == 1 then return {} end
local size, n = tonumber(ARGV[4]), 0
local first = {}
for i = 10, #ARGV, 2 do
  local item, payload = ARGV[i], ARGV[i + 1]
  if ARGV[7] == '1' then redis.call('RPUSH', KEYS[5], item) end
  if redis.call('HSETNX', KEYS[3], item, 'p') == 1 then
    redis.call('HSET', KEYS[7], item, ARGV[1])
    if n < size then
      redis.call('HSET', KEYS[4], item, payload)
      first[#first + 1] = item
      first[#first + 1] = payload
    else
      redis.call('HSET', KEYS[8], ARGV[1] .. ':' .. n, item .. '\n' .. payload)
    end
    n = n + 1
  end
end
local state = {task = ARGV[2], stage = ARGV[3], size = size, total = n,
  released = math.min(n, size), done = 0, s = 0, f = 0, k = 0, c = 0,
  switch = ARGV[5], per_item = tonumber(ARGV[6]), deciding = 0, complete = 0}
-- An empty map has nothing to wait for: no token.
if n == 0 then state.complete = 1 end
redis.call('HSET', KEYS[6], ARGV[1], cjson.encode(state))
local held = n
if n > 0 then held = held + 1 end
if ARGV[7] == '1' then held = held - 1 end  -- the creation hold becomes the map's token
redis.call('HINCRBY', KEYS[1], 'pending', held)
redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':enqueued', n)
redis.call('HSET', KEYS[1], 'progress_at', ARGV[8])
local ttl = tonumber(ARGV[9])
for i = 1, 8 do redis.call('EXPIRE', KEYS[i], ttl) end
return first
