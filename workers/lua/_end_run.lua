-- A snippet, not a script: scripts.py puts it where a script says "-- INCLUDE: _end_run".
-- The run's last pending item (or batch map token) is gone, so the run ends. A run still
-- 'running' ends 'succeeded', or 'partial' when an item failed; a killed or cancelled run keeps
-- its status (``failed`` may then be nil). Every waiter is told on the done list.
local function end_run(run, failed, done, now)
  local status = redis.call('HGET', run, 'status')
  if status == 'running' then
    status = 'succeeded'
    if redis.call('HLEN', failed) > 0 then status = 'partial' end
    redis.call('HSET', run, 'status', status)
  end
  redis.call('HSET', run, 'finished_at', now)
  redis.call('RPUSH', done, status)
  return status
end
