-- Move items of one run to a terminal state, each exactly once, and finish the run with the
-- last. One call per run per claimed batch (a leaf batch is one round trip, not one per item).
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
--       batchmaps, bmof, bmqueue, fanned
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
local run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
  batchmaps, bmof, bmqueue, fanned = unpack(KEYS)
-- INCLUDE: _end_run
local now, ttl_s = ARGV[1], tonumber(ARGV[2])
local counters = {s = 'succeeded', f = 'failed', c = 'cached', k = 'skipped'}
local replies = {}
local counted = 0
local finished = false

-- Count a finished item in its batch map; returns the map id (or '') and deciding.
local function count_in_map(item, outcome)
  local map_id = redis.call('HGET', bmof, item)
  if not map_id then return '', 0 end
  local raw = redis.call('HGET', batchmaps, map_id)
  local map = raw and cjson.decode(raw)
  if not map or map.complete == 1 then return '', 0 end
  local deciding = 0
  map.done = map.done + 1
  map[outcome] = map[outcome] + 1
  if map.done == map.released and map.deciding == 0 then
    map.deciding, deciding = 1, 1
  end
  redis.call('HSET', batchmaps, map_id, cjson.encode(map))
  if deciding == 1 or map.per_item == 1 then return map_id, deciding end
  return '', 0
end

-- One item; returns code, map id, deciding.
local function finish(item, stage, outcome, rows, failure, result, iteration)
  local state = redis.call('HGET', items, item)
  if not state then return -1, '', 0 end
  if state ~= 'p' then return 0, '', 0 end
  if iteration > 0 then
    -- A stale iteration (the loop already moved past it) must not end the loop.
    local loop = redis.call('HGET', loops, item)
    local current = 1
    if loop then current = cjson.decode(loop)['iteration'] end
    if current ~= iteration then return 0, '', 0 end
    if loop then
      redis.call('HDEL', loops, item)
      redis.call('HINCRBY', counts, stage .. ':iterations', 1)
    end
  end
  redis.call('HSET', items, item, outcome)
  redis.call('HDEL', payloads, item)
  redis.call('HINCRBY', counts, stage .. ':' .. counters[outcome], 1)
  if rows > 0 then redis.call('HINCRBY', counts, 'rows', rows) end
  if failure ~= '' then
    redis.call('HSET', failed, item, failure)
    redis.call('EXPIRE', failed, ttl_s)
  end
  if result ~= '' then
    redis.call('HSET', results, item, result)
    redis.call('EXPIRE', results, ttl_s)
  end
  local map_id, deciding = count_in_map(item, outcome)
  counted = counted + 1
  if not lower_pending(run, failed, done, 1, now, ttl_s) then return 1, map_id, deciding end
  finished = true  -- the last terminal item finished the run
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
  redis.call('HSET', run, 'progress_at', now)
  -- The run's keys live while it progresses: refreshed once half their TTL is gone (one TTL
  -- read per call); end_run refreshed them all when the run ended.
  if not finished and redis.call('TTL', run) < ttl_s / 2 then refresh_run(ttl_s) end
end
return replies
