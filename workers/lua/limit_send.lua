-- The last check before an async call goes out (Limits.acquire_async), after it slept until
-- its GCRA turn: a call that woke late must not land next to the calls whose turns come after
-- it. So sends are spaced here, at the moment they go: one passes when at least GAP has gone
-- by since the last that passed (server time), and only while the limit is not pushed back.
-- KEYS: sent, backoff, aimd
--   sent: string, when the last call passed this check (epoch seconds)
--   backoff: string, nothing passes before this time (limit_backoff.lua)
--   aimd: hash, a rate = "auto" limit's current rate (_limit_aimd.lua)
-- ARGV: [1] gap in seconds (0: no spacing, only the push-back counts), [2] an auto limit: the
--       gap in intervals of its current rate ('' or none: not auto), [3] its starting rate
-- Returns {1, now} to go now (now: server time, for the caller to see how late it goes), {0, wait_s, 0} to check again after wait_s (the gap), or
-- {0, wait_s, 1} when pushed back (the call takes a new turn after the push-back).
local sent, backoff = KEYS[1], KEYS[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local not_before = tonumber(redis.call('GET', backoff) or 0)
if not_before > now then return {0, string.format('%.6f', not_before - now), 1} end
local gap = tonumber(ARGV[1])
if ARGV[2] and ARGV[2] ~= '' then
  gap = tonumber(ARGV[2]) / tonumber(redis.call('HGET', KEYS[3], 'rate') or ARGV[3])
end
if gap > 0 then
  local next_at = tonumber(redis.call('GET', sent) or 0) + gap
  if next_at > now then return {0, string.format('%.6f', next_at - now), 0} end
  redis.call('SET', sent, string.format('%.6f', now), 'PX', math.ceil(gap * 1000) + 1000)
end
return {1, string.format('%.6f', now)}
