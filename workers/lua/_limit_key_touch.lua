-- A key of a limit used per key is in use until now + idle: its entry in the template's index
-- (key -> when it goes idle) moves on, entries gone idle are dropped, and the index itself
-- expires once its last key has. No key: nothing to do.
local function touch_key(index, key, now, idle)
  if key == nil or key == '' then return end
  redis.call('ZADD', index, string.format('%.6f', now + idle), key)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%.6f', now))
  redis.call('PEXPIRE', index, math.ceil(idle * 1000) + 1000)
end
