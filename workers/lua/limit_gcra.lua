-- Take COST from a limit's rate with the Generic Cell Rate Algorithm (policy/gcra.py does the
-- same arithmetic), unless the limit is pushed back. On Redis server time, and the read and the
-- write are one atomic step, so every worker on every host shares one clock and one state.
-- KEYS: tat, backoff
--   tat: string, the limit's theoretical arrival time (epoch seconds); gone = idle
--   backoff: string, nothing passes before this time (epoch seconds; limit_backoff.lua)
-- ARGV: [1] emission interval in seconds (0: the limit has no rate, only the push-back counts),
--       [2] burst (>= 1), [3] cost (1 <= cost <= burst)
-- Returns {1, "0"} when allowed, {0, wait_s} when not; wait_s is a string because Redis
-- truncates Lua numbers to integers.
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local not_before = tonumber(redis.call('GET', KEYS[2]) or 0)
if now < not_before then return {0, string.format('%.6f', not_before - now)} end
local interval = tonumber(ARGV[1])
if interval <= 0 then return {1, '0'} end
local cost = tonumber(ARGV[3])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local allow_at = tat + (cost - tonumber(ARGV[2])) * interval
if now < allow_at then return {0, string.format('%.6f', allow_at - now)} end
local new_tat = tat + cost * interval
-- Once new_tat has passed it means the same as no state: expire a second after that.
local ttl_ms = math.ceil((new_tat - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', ttl_ms)
return {1, '0'}
