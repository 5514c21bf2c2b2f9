-- A batch of a batch map completed and its kill switch did not trip (the engine checked):
-- release the next batch, or, after the last one, give back the map's pending token (which
-- may finish the run). Only a map that is deciding is settled, so this happens once.
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
--       batchmaps, bmof, bmqueue, fanned
-- ARGV: [1] map id, [2] now, [3] ttl_s
-- Returns the batch to publish: {id, payload, ...} ({} after the last batch).
local run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
  batchmaps, bmof, bmqueue, fanned = unpack(KEYS)
-- INCLUDE: _end_run
-- INCLUDE: _bmqueue
local map_id, now, ttl_s = ARGV[1], ARGV[2], tonumber(ARGV[3])
local raw = redis.call('HGET', batchmaps, map_id)
if not raw then return {} end
local state = cjson.decode(raw)
if state.deciding ~= 1 then return {} end
state.deciding = 0
local out = {}
if state.released < state.total then
  local last = math.min(state.total, state.released + state.size) - 1
  for k = state.released, last do
    local field = map_id .. ':' .. k
    local entry = redis.call('HGET', bmqueue, field)
    if entry then
      local item, payload = split_entry(entry)
      redis.call('HSET', payloads, item, payload)
      redis.call('HDEL', bmqueue, field)
      out[#out + 1] = item
      out[#out + 1] = payload
    end
  end
  state.released = last + 1
  redis.call('HSET', batchmaps, map_id, cjson.encode(state))
  redis.call('HSET', run, 'progress_at', now)
  return out
end
state.complete = 1
redis.call('HSET', batchmaps, map_id, cjson.encode(state))
lower_pending(run, failed, done, 1, now, ttl_s)  -- the map's token: may end the run
return out
