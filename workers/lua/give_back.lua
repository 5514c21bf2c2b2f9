-- Put claimed messages back on their queue at once: their batch met an infrastructure error
-- (the sink or Redis), so the items did not fail, and must not wait for their worker's death.
-- Only messages still claimed go back (one the reaper already restored is not doubled).
-- KEYS: claimed, claimers, queue
-- ARGV: the messages
-- Returns how many went back.
local back = 0
-- At the consuming end, so they go first; the last one first, so they keep their order.
for i = #ARGV, 1, -1 do
  redis.call('HDEL', KEYS[2], ARGV[i])
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[i])
    back = back + 1
  end
end
return back
