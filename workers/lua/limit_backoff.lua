-- Push a limit back: nothing passes before now + ARGV[1] (server time), for every worker that
-- shares the limit (a vendor's 429 with Retry-After). A push-back ending sooner than the one
-- in force changes nothing, so many workers seeing the same 429 push it back once.
-- An auto limit's rate is cut here too (the vendor refused a call: a 429 or a 503).
-- KEYS: backoff, keys, aimd
--   backoff: string, nothing passes before this time (epoch seconds)
--   keys: sorted set, the template's keys in use (_limit_key_touch.lua)
--   aimd: hash, a rate = "auto" limit's current rate (_limit_aimd.lua)
-- ARGV: [1] seconds from now, [2] the key of a limit used per key ('' or none: not per key),
--       [3] seconds a key stays in use after its last call, [4] '1': cut an auto limit's
--       rate ('' or none: not auto), [5-13] its AIMD parameters (_limit_aimd.lua)
-- Returns the seconds from now until the limit opens again (a string; see limit_gcra.lua).
-- INCLUDE: _limit_key_touch
-- INCLUDE: _limit_aimd
local backoff = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
touch_key(KEYS[2], ARGV[2], now, math.max(tonumber(ARGV[3] or 0), tonumber(ARGV[1])))
if ARGV[4] == '1' then aimd_cut(KEYS[3], now, aimd_params(ARGV, 5)) end
local not_before = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', backoff) or 0)
if current >= not_before then return string.format('%.6f', current - now) end
local ttl_ms = math.ceil(tonumber(ARGV[1]) * 1000) + 1000
redis.call('SET', backoff, string.format('%.6f', not_before), 'PX', ttl_ms)
return string.format('%.6f', not_before - now)
