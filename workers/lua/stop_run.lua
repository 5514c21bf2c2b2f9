-- Stop a run: a kill switch tripped ('killed') or a person cancelled it ('cancelled'). Items no
-- message was published for yet (later batches of its batch maps) are counted skipped at once;
-- items already on a queue or delayed are skipped by the worker that takes them (it sees the
-- status). The run then ends when its last in-flight item does, keeping this status.
-- KEYS: run, counts, items, done, batchmaps, bmqueue
-- ARGV: [1] status (killed | cancelled), [2] reason, [3] now, [4] ttl_s
-- Returns the number of items skipped here, or -1 when the run had already finished.
-- INCLUDE: _end_run
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NORUN the run is unknown or expired') end
if status ~= 'running' then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'stop_reason', ARGV[2], 'progress_at', ARGV[3])
local skipped, tokens = 0, 0
local maps = redis.call('HGETALL', KEYS[5])
for i = 1, #maps, 2 do
  local state = cjson.decode(maps[i + 1])
  if state.complete ~= 1 then
    for k = state.released, state.total - 1 do
      local field = maps[i] .. ':' .. k
      local entry = redis.call('HGET', KEYS[6], field)
      if entry then
        local item = string.sub(entry, 1, string.find(entry, '\n', 1, true) - 1)
        if redis.call('HGET', KEYS[3], item) == 'p' then
          redis.call('HSET', KEYS[3], item, 'k')
          redis.call('HINCRBY', KEYS[2], state.stage .. ':skipped', 1)
          skipped = skipped + 1
        end
        redis.call('HDEL', KEYS[6], field)
      end
    end
    state.released, state.complete, state.deciding = state.total, 1, 0
    redis.call('HSET', KEYS[5], maps[i], cjson.encode(state))
    tokens = tokens + 1
  end
end
local pending = redis.call('HINCRBY', KEYS[1], 'pending', -(skipped + tokens))
if pending <= 0 then
  end_run(KEYS[1], nil, KEYS[4], ARGV[3])  -- keeps its status (killed or cancelled)
  local ttl = tonumber(ARGV[4])
  for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return skipped
