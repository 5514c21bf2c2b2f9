-- Put claimed messages back on their queue at once: their batch met an infrastructure error
-- (the sink or Redis), so the items did not fail, and must not wait for the visibility timeout.
-- Only messages still claimed go back (one the reaper already restored is not doubled).
-- KEYS: claimed, queue
-- ARGV: the messages
-- Returns how many went back.
local back = 0
-- At the consuming end, so they go first; the last one first, so they keep their order.
for i = #ARGV, 1, -1 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    back = back + 1
  end
end
return back
