-- Give back a pass of the send check (limit_send.lua) whose call did not go out: its answer
-- reached a busy loop too late to use, and the call asks again. Without this, every such
-- pass spent a whole gap with no call sent in it (at a loaded 100/s limit, a third of them).
-- Only while the pass is still the last one: a later pass (none can come within the gap,
-- but the key may have expired and been set anew) is left alone.
-- KEYS: sent
--   sent: string, when the last call passed the check (epoch seconds)
-- ARGV: [1] the pass's mark, [2] the mark it replaced ('' for none), [3] the key's TTL in ms
-- Returns 1 when given back, 0 when the pass was no longer the last.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
end
return 1
