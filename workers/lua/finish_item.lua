-- Move items of one run to a terminal state, each exactly once, and finish the run with the
-- last. One call per run per claimed batch (a leaf batch is one round trip, not one per item).
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, batchmaps, bmof
-- ARGV: [1] now (epoch seconds), [2] ttl_s, then 7 per item:
--       item id, stage, outcome (s succeeded | f failed | c cached | k skipped), sink rows
--       written, failure JSON or '', result JSON or '', the iteration that ended the item
--       (1 unless it looped; 0: any)
-- Returns 3 per item, in order: code, map id or '', deciding. code is -1 when the item was
-- never registered, 0 when it was already terminal (a duplicate delivery) or the loop had
-- moved past that iteration, 1 when counted, 2 when counted and it finished the run. An item
-- of a batch map is counted in its map too, and then comes back with its map id when the
-- engine has something to do: deciding is 1 for the one item that completed its batch (check
-- the switch, release the next), 0 for any item of a map whose switch is checked per item.
-- INCLUDE: _end_run
local now, ttl = ARGV[1], tonumber(ARGV[2])
local counters = {s = 'succeeded', f = 'failed', c = 'cached', k = 'skipped'}
local replies = {}
local counted = 0
local finished = false

-- One item; returns code, map id, deciding.
local function finish(item, stage, outcome, rows, failure, result, iteration)
  local state = redis.call('HGET', KEYS[3], item)
  if not state then return -1, '', 0 end
  if state ~= 'p' then return 0, '', 0 end
  if iteration > 0 then
    -- A stale iteration (the loop already moved past it) must not end the loop.
    local loop = redis.call('HGET', KEYS[8], item)
    local current = 1
    if loop then current = cjson.decode(loop)['iteration'] end
    if current ~= iteration then return 0, '', 0 end
    if loop then
      redis.call('HDEL', KEYS[8], item)
      redis.call('HINCRBY', KEYS[2], stage .. ':iterations', 1)
    end
  end
  redis.call('HSET', KEYS[3], item, outcome)
  redis.call('HDEL', KEYS[6], item)
  redis.call('HINCRBY', KEYS[2], stage .. ':' .. counters[outcome], 1)
  if rows > 0 then redis.call('HINCRBY', KEYS[2], 'rows', rows) end
  if failure ~= '' then
    redis.call('HSET', KEYS[4], item, failure)
    redis.call('EXPIRE', KEYS[4], ttl)
  end
  if result ~= '' then
    redis.call('HSET', KEYS[7], item, result)
    redis.call('EXPIRE', KEYS[7], ttl)
  end
  local map_id, deciding = '', 0
  local in_map = redis.call('HGET', KEYS[11], item)
  if in_map then
    local raw = redis.call('HGET', KEYS[10], in_map)
    local map = raw and cjson.decode(raw)
    if map and map.complete ~= 1 then
      map.done = map.done + 1
      map[outcome] = map[outcome] + 1
      if map.done == map.released and map.deciding == 0 then
        map.deciding, deciding = 1, 1
      end
      redis.call('HSET', KEYS[10], in_map, cjson.encode(map))
      if deciding == 1 or map.per_item == 1 then map_id = in_map end
    end
  end
  counted = counted + 1
  if redis.call('HINCRBY', KEYS[1], 'pending', -1) > 0 then return 1, map_id, deciding end
  end_run(KEYS[1], KEYS[4], KEYS[5], now)  -- the last terminal item finishes the run
  finished = true
  return 2, map_id, deciding
end

for i = 3, #ARGV, 7 do
  local code, map_id, deciding = finish(ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]),
    ARGV[i + 4], ARGV[i + 5], tonumber(ARGV[i + 6]))
  replies[#replies + 1] = code
  replies[#replies + 1] = map_id
  replies[#replies + 1] = deciding
end
if counted > 0 then
  redis.call('HSET', KEYS[1], 'progress_at', now)
  -- The run's keys live while it progresses: refreshed once half their TTL is gone (one TTL
  -- read per call), and all of them when the run ends.
  if finished or redis.call('TTL', KEYS[1]) < ttl / 2 then
    for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
return replies
