-- Stop a run: a kill switch tripped ('killed') or a person cancelled it ('cancelled'). Items no
-- message was published for yet (later batches of its batch maps) are counted skipped at once;
-- items already on a queue or delayed are skipped by the worker that takes them (it sees the
-- status). The run then ends when its last in-flight item does, keeping this status.
-- KEYS: run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
--       batchmaps, bmof, bmqueue, fanned
-- ARGV: [1] status (killed | cancelled), [2] reason, [3] now, [4] ttl_s
-- Returns the number of items skipped here, or -1 when the run had already finished (or
-- stopped). Error NORUN: the run is unknown or expired.
local run, counts, items, failed, done, payloads, results, loops, roots, delayed, tries,
  batchmaps, bmof, bmqueue, fanned = unpack(KEYS)
-- INCLUDE: _end_run
-- INCLUDE: _bmqueue
local stop_status, reason, now, ttl_s = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local status = redis.call('HGET', run, 'status')
if not status then return redis.error_reply('NORUN the run is unknown or expired') end
if status ~= 'running' then return -1 end
redis.call('HSET', run, 'status', stop_status, 'stop_reason', reason, 'progress_at', now)
local skipped, tokens = 0, 0
local maps = redis.call('HGETALL', batchmaps)
for i = 1, #maps, 2 do
  local state = cjson.decode(maps[i + 1])
  if state.complete ~= 1 then
    for k = state.released, state.total - 1 do
      local field = maps[i] .. ':' .. k
      local entry = redis.call('HGET', bmqueue, field)
      if entry then
        local item = split_entry(entry)
        if redis.call('HGET', items, item) == 'p' then
          redis.call('HSET', items, item, 'k')
          redis.call('HINCRBY', counts, state.stage .. ':skipped', 1)
          skipped = skipped + 1
        end
        redis.call('HDEL', bmqueue, field)
      end
    end
    state.released, state.complete, state.deciding = state.total, 1, 0
    redis.call('HSET', batchmaps, maps[i], cjson.encode(state))
    tokens = tokens + 1
  end
end
-- Ends the run (keeping its status) when nothing was in flight.
lower_pending(run, failed, done, skipped + tokens, now, ttl_s)
return skipped
