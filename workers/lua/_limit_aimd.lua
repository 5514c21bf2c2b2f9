-- A rate = "auto" limit's current rate (policy/aimd.py has the same arithmetic and the
-- constants, passed in as P). State: a hash {rate, slow (1: slow start), last_cut}, expiring
-- when the limit (or key) goes idle: it then starts again from P.start.
-- P: {start, floor, ceiling, slow_gain, step, slow_cut, cut, window, idle}
local function aimd_params(argv, from)
  local names = {'start', 'floor', 'ceiling', 'slow_gain', 'step', 'slow_cut', 'cut', 'window',
                 'idle'}
  local p = {}
  for i, name in ipairs(names) do p[name] = tonumber(argv[from + i - 1]) end
  return p
end

local function aimd_state(aimd, p)
  local s = redis.call('HMGET', aimd, 'rate', 'slow', 'last_cut')
  if not s[1] then return math.min(math.max(p.start, p.floor), p.ceiling), true, 0 end
  return tonumber(s[1]), s[2] == '1', tonumber(s[3])
end

local function aimd_save(aimd, rate, slow, last_cut, p)
  redis.call('HSET', aimd, 'rate', string.format('%.6f', rate), 'slow', slow and '1' or '0',
             'last_cut', string.format('%.6f', last_cut))
  redis.call('PEXPIRE', aimd, math.ceil(p.idle * 1000))
end

-- The rate after SUCCESSES more answered calls.
local function aimd_grow(aimd, successes, p)
  local rate, slow, last_cut = aimd_state(aimd, p)
  if successes > 0 then
    if slow then rate = rate + successes * p.slow_gain
    else rate = rate + successes * p.step / rate end
    rate = math.min(math.max(rate, p.floor), p.ceiling)
  end
  aimd_save(aimd, rate, slow, last_cut, p)
  return rate
end

-- The rate after a 429 or 503 at NOW (one cut per window).
local function aimd_cut(aimd, now, p)
  local rate, slow, last_cut = aimd_state(aimd, p)
  if now - last_cut >= p.window then
    rate = math.max(rate * (slow and p.slow_cut or p.cut), p.floor)
    slow, last_cut = false, now
  end
  aimd_save(aimd, rate, slow, last_cut, p)
  return rate
end
