-- A batch of a batch map completed and its kill switch did not trip (the engine checked):
-- release the next batch, or, after the last one, give back the map's pending token (which
-- may finish the run). Only a map that is deciding is settled, so this happens once.
-- KEYS: run, counts, failed, done, payloads, batchmaps, bmqueue
-- ARGV: [1] map id, [2] now, [3] ttl_s
-- Returns the batch to publish: {id, payload, ...} ({} after the last batch).
-- INCLUDE: _end_run
local raw = redis.call('HGET', KEYS[6], ARGV[1])
if not raw then return {} end
local state = cjson.decode(raw)
if state.deciding ~= 1 then return {} end
state.deciding = 0
local out = {}
if state.released < state.total then
  local last = math.min(state.total, state.released + state.size) - 1
  for k = state.released, last do
    local field = ARGV[1] .. ':' .. k
    local entry = redis.call('HGET', KEYS[7], field)
    if entry then
      local cut = string.find(entry, '\n', 1, true)
      local item, payload = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
      redis.call('HSET', KEYS[5], item, payload)
      redis.call('HDEL', KEYS[7], field)
      out[#out + 1] = item
      out[#out + 1] = payload
    end
  end
  state.released = last + 1
  redis.call('HSET', KEYS[6], ARGV[1], cjson.encode(state))
  redis.call('HSET', KEYS[1], 'progress_at', ARGV[2])
  return out
end
state.complete = 1
redis.call('HSET', KEYS[6], ARGV[1], cjson.encode(state))
local pending = redis.call('HINCRBY', KEYS[1], 'pending', -1)
if pending == 0 then
  end_run(KEYS[1], KEYS[3], KEYS[4], ARGV[2])
  local ttl = tonumber(ARGV[3])
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return out
