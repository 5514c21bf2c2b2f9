-- Move one item to a terminal state, exactly once, and finish the run when it was the last.
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, batchmaps, bmof
-- ARGV: [1] item id, [2] stage, [3] outcome: s succeeded | f failed | c cached | k skipped,
--       [4] sink rows written, [5] failure JSON or '', [6] now (epoch seconds), [7] ttl_s,
--       [8] result JSON or '', [9] the iteration that ended the item (1 unless it looped)
-- Returns 0 when the item was already terminal (a duplicate delivery), 1 when counted,
-- 2 when counted and it finished the run. An item of a batch map is counted in its map too,
-- and then {code, map id, deciding} comes back when the engine has something to do: deciding
-- is 1 for the one item that completed its batch (check the switch, release the next), 0 for
-- any item of a map whose switch is checked per item.
local state = redis.call('HGET', KEYS[3], ARGV[1])
if not state then
  return redis.error_reply('NOITEM item ' .. ARGV[1] .. ' was never registered')
end
if state ~= 'p' then return 0 end
local ttl = tonumber(ARGV[7])
-- The run's keys live while it progresses: refreshed once half their TTL is gone (one TTL
-- read per finish), and all of them again when the run ends.
local function refresh()
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
end
local iteration = tonumber(ARGV[9])
if iteration > 0 then
  -- A stale iteration (the loop already moved past it) must not end the loop.
  local loop = redis.call('HGET', KEYS[8], ARGV[1])
  local current = 1
  if loop then current = cjson.decode(loop)['iteration'] end
  if current ~= iteration then return 0 end
  if loop then
    redis.call('HDEL', KEYS[8], ARGV[1])
    redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':iterations', 1)
  end
end
local counters = {s = 'succeeded', f = 'failed', c = 'cached', k = 'skipped'}
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':' .. counters[ARGV[3]], 1)
local rows = tonumber(ARGV[4])
if rows > 0 then redis.call('HINCRBY', KEYS[2], 'rows', rows) end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ttl)
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[8])
  redis.call('EXPIRE', KEYS[7], ttl)
end
redis.call('HSET', KEYS[1], 'progress_at', ARGV[6])
local signal = nil
local map_id = redis.call('HGET', KEYS[11], ARGV[1])
if map_id then
  local raw = redis.call('HGET', KEYS[10], map_id)
  local map = raw and cjson.decode(raw)
  if map and map.complete ~= 1 then
    map.done = map.done + 1
    map[ARGV[3]] = map[ARGV[3]] + 1
    local deciding = 0
    if map.done == map.released and map.deciding == 0 then
      map.deciding, deciding = 1, 1
    end
    redis.call('HSET', KEYS[10], map_id, cjson.encode(map))
    if deciding == 1 or map.per_item == 1 then signal = {map_id, deciding} end
  end
end
local pending = redis.call('HINCRBY', KEYS[1], 'pending', -1)
if pending > 0 then
  if redis.call('TTL', KEYS[1]) < ttl / 2 then refresh() end
  if signal then return {1, signal[1], signal[2]} end
  return 1
end
-- The last terminal item finishes the run. A run already killed or cancelled keeps that status.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' then
  status = 'succeeded'
  if redis.call('HLEN', KEYS[4]) > 0 then status = 'partial' end
  redis.call('HSET', KEYS[1], 'status', status)
end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[6])
redis.call('RPUSH', KEYS[5], status)
refresh()
return 2
