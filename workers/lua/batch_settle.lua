-- A batch of a batch map completed and its kill switch did not trip (the engine checked):
-- release the next batch, or, after the last one, give back the map's pending token (which
-- may finish the run). Only a map that is deciding is settled, so this happens once.
-- KEYS: run, counts, failed, done, payloads, batchmaps, bmqueue
-- ARGV: [1] map id, [2] now, [3] ttl_s
-- Returns the batch to publish: {id, payload, ...} ({} after the last batch).
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
-- Finishing the run: the same steps as finish_item.lua's end (Lua scripts share no code).
if pending == 0 then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status == 'running' then
    status = 'succeeded'
    if redis.call('HLEN', KEYS[3]) > 0 then status = 'partial' end
    redis.call('HSET', KEYS[1], 'status', status)
  end
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  redis.call('RPUSH', KEYS[4], status)
  local ttl = tonumber(ARGV[3])
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return out
