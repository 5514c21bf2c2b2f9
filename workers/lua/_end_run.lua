-- A snippet, not a script: scripts.py puts it where a script says "-- INCLUDE: _end_run".
-- A script that includes it is given every key of the run (keys.RunKeys, in that order:
-- tests/test_ledger_lua.py checks it), so ending or refreshing a run reaches them all.

-- Every key of the run lives ttl_s more (a key that does not exist stays absent).
local function refresh_run(ttl_s)
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl_s) end
end

-- The run's last pending item (or batch map token) is gone, so the run ends. A run still
-- 'running' ends 'succeeded', or 'partial' when an item failed; a killed or cancelled run keeps
-- its status. Every waiter is told on the done list, and every key of the run lives ttl_s more
-- from now (what `fanout status` and `results` read must outlive the run by the same TTL).
local function end_run(run, failed, done, now, ttl_s)
  local status = redis.call('HGET', run, 'status')
  if status == 'running' then
    status = 'succeeded'
    if redis.call('HLEN', failed) > 0 then status = 'partial' end
    redis.call('HSET', run, 'status', status)
  end
  redis.call('HSET', run, 'finished_at', now)
  redis.call('RPUSH', done, status)
  refresh_run(ttl_s)
  return status
end

-- Lower the run's pending count by n (its items or batch map tokens that are gone); the call
-- that brings it to zero ends the run. Returns true when it did.
local function lower_pending(run, failed, done, n, now, ttl_s)
  if redis.call('HINCRBY', run, 'pending', -n) > 0 then return false end
  end_run(run, failed, done, now, ttl_s)
  return true
end
