-- The last check before an async call goes out (Limits.acquire_async), after it slept until
-- its GCRA turn: a call that woke late must not land next to the calls whose turns come after
-- it. So sends are spaced here, at the moment they go: one passes when at least GAP has gone
-- by since the last that passed (server time), and only while the limit is not pushed back.
-- KEYS: sent, backoff, aimd
--   sent: string, when the last call passed this check (epoch seconds)
--   backoff: string, nothing passes before this time (limit_backoff.lua)
--   aimd: hash, a rate = "auto" limit's current rate (_limit_aimd.lua)
-- ARGV: [1] gap in seconds (0: no spacing, only the push-back counts), [2] an auto limit: the
--       gap in intervals of its current rate ('' or none: not auto), [3] its starting rate,
--       [4] the longest wait for the gap to reserve (0: none)
-- A call that finds the gap not yet over by at most ARGV[4] reserves the moment it ends: it
-- sleeps until then and goes without asking again. Asking again after the wait made each send
-- a sleep's lateness and a round trip later than the one before it, and the limit ran at
-- 1.2x its interval (at 100/s: a median gap of 11.9 ms against turns 10.5 ms apart).
-- Returns {1, now, before, mark, wait_s} to go after wait_s (now: server time, for the caller
-- to see how late the answer came; mark: when this call goes, left as the last pass; before:
-- the mark it replaced, '' for none: a call that does not go after all gives its pass back
-- with limit_unsend.lua), {0, wait_s, 0} to check again after wait_s (the gap), or
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
local stamp = string.format('%.6f', now)
if gap <= 0 then return {1, stamp, '', stamp, '0'} end
local before = redis.call('GET', sent) or ''
local go_at = math.max((tonumber(before) or 0) + gap, now)
if go_at - now > tonumber(ARGV[4] or 0) then
  return {0, string.format('%.6f', go_at - now), 0}
end
local mark = string.format('%.6f', go_at)
redis.call('SET', sent, mark, 'PX', math.ceil((go_at - now + gap) * 1000) + 1000)
return {1, stamp, before, mark, string.format('%.6f', go_at - now)}
