-- Take COST from a limit's rate with the Generic Cell Rate Algorithm (policy/gcra.py does the
-- same arithmetic), unless the limit is pushed back. On Redis server time, and the read and the
-- write are one atomic step, so every worker on every host shares one clock and one state.
-- A caller willing to wait up to MAX_WAIT reserves its turn: it is allowed with the seconds to
-- sleep first, so many waiting callers are spaced at the rate instead of racing for each turn.
-- KEYS: tat, backoff, keys, aimd
--   tat: string, the limit's theoretical arrival time (epoch seconds); gone = idle
--   backoff: string, nothing passes before this time (epoch seconds; limit_backoff.lua)
--   keys: sorted set, the template's keys in use (_limit_key_touch.lua)
--   aimd: hash, a rate = "auto" limit's current rate (_limit_aimd.lua)
-- ARGV: [1] emission interval in seconds (0: the limit has no rate, only the push-back counts;
--       an auto limit: in intervals of its current rate, i.e. the headroom),
--       [2] burst (>= 1), [3] cost (1 <= cost <= burst), [4] max wait in seconds (0: now or
--       not at all), [5] the key of a limit used per key ('' or none: not per key),
--       [6] seconds a key stays in use after its last call, [7] an auto limit: the calls
--       answered since this process last reported ('' or none: not auto), [8-16] its AIMD
--       parameters (_limit_aimd.lua)
-- Returns {1, wait_s} when allowed (after sleeping wait_s, "0" for at once), {0, wait_s} when
-- refused; wait_s is a string because Redis truncates Lua numbers to integers.
-- INCLUDE: _limit_key_touch
-- INCLUDE: _limit_aimd
local tat_key, backoff = KEYS[1], KEYS[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
touch_key(KEYS[3], ARGV[5], now, tonumber(ARGV[6] or 0))
local max_wait = tonumber(ARGV[4] or 0)
local not_before = math.max(tonumber(redis.call('GET', backoff) or 0), now)
local interval = tonumber(ARGV[1])
if ARGV[7] and ARGV[7] ~= '' then
  -- Successes raise the rate only while calls queue for their turns (the limit is what holds
  -- them back): a rate the callers do not use proves nothing (RFC 7661's cwnd validation).
  local queued = tonumber(redis.call('GET', tat_key) or 0) > now
  interval = interval / aimd_grow(KEYS[4], queued and tonumber(ARGV[7]) or 0,
                                  aimd_params(ARGV, 8))
end
if interval <= 0 then
  if not_before - now > max_wait then return {0, string.format('%.6f', not_before - now)} end
  return {1, string.format('%.6f', not_before - now)}
end
local cost = tonumber(ARGV[3])
local tat = math.max(tonumber(redis.call('GET', tat_key) or 0), not_before)
local allow_at = math.max(tat + (cost - tonumber(ARGV[2])) * interval, not_before)
if allow_at - now > max_wait then return {0, string.format('%.6f', allow_at - now)} end
local new_tat = tat + cost * interval
-- Once new_tat has passed it means the same as no state: expire a second after that.
local ttl_ms = math.ceil((new_tat - now) * 1000) + 1000
redis.call('SET', tat_key, string.format('%.6f', new_tat), 'PX', ttl_ms)
return {1, string.format('%.6f', allow_at - now)}
