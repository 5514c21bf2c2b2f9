-- Take up to N messages off a stage queue for one worker to run in a batch, recording them
-- as claimed, with the time and the worker, in the same step: none is ever off the queue
-- unrecorded, and each is put back when its worker dies (restore_claimed.lua), never by age.
-- The queue is its lanes, one per run waiting (publish.lua): a claim takes from every lane
-- that waits, in proportion to the lanes' weights (their runs' priorities), so a small run
-- queued behind a large one is taken beside it, not after it.
-- KEYS: queue, claimed, claimers, workers, worker_queues, map, lane1, lane2, lane3, lane4,
--       lane5, lane6, lane7, lane8, lane9
--   queue: kombu's list for the stage queue (lane 0; consumers pop from the right);
--   claimed: the queue's sorted set, claimed message -> claim time (server time);
--   claimers: the queue's hash, claimed message -> worker id;
--   workers: the workers index, worker id -> last heartbeat (server time);
--   worker_queues: the set of queues this worker claimed on (where to look when it dies);
--   map: the queue's lane map (weight:LANE, credit:LANE); lane1..lane9: the other lanes
-- ARGV: [1] how many at most, [2] worker id, [3] ttl_s, [4] share: the threads that compete
--       for this queue; a claim takes no more than its fair share of what waits (the lanes'
--       length / share), so one thread never hoards a short queue while others idle
-- The claimer joins the workers index if it is not there yet (ZADD NX: a beat is not moved
-- back), so a process that claims and never beats is found dead all the same.
-- Returns the messages taken.
local lanes = {KEYS[1]}
for i = 7, #KEYS do lanes[#lanes + 1] = KEYS[i] end
local waiting, total, active = {}, 0, {}
for i, key in ipairs(lanes) do
  waiting[i] = redis.call('LLEN', key)
  total = total + waiting[i]
  if waiting[i] > 0 then active[#active + 1] = i end
end
local count = math.min(tonumber(ARGV[1]), math.floor(total / math.max(1, tonumber(ARGV[4]))))
if count < 1 then return {} end
local take = {}
if #active == 1 then
  take[active[1]] = count
else
  -- Whole rounds first (each lane its weight), then one at a time by smooth weighted
  -- round-robin (nginx's), whose credits persist in the map: small claims stay fair too.
  local fields = {}
  for _, i in ipairs(active) do
    fields[#fields + 1] = 'weight:' .. (i - 1)
    fields[#fields + 1] = 'credit:' .. (i - 1)
  end
  local found = redis.call('HMGET', KEYS[6], unpack(fields))
  local weight, credit, sum, left = {}, {}, 0, count
  for n, i in ipairs(active) do
    weight[i] = math.max(1, tonumber(found[2 * n - 1]) or 1)
    credit[i] = tonumber(found[2 * n]) or 0
    sum = sum + weight[i]
  end
  local rounds = math.floor(count / sum)
  for _, i in ipairs(active) do
    take[i] = math.min(waiting[i], rounds * weight[i])
    left = left - take[i]
  end
  while left > 0 do
    local best, turn = nil, 0
    for _, i in ipairs(active) do
      if take[i] < waiting[i] then
        credit[i] = credit[i] + weight[i]
        turn = turn + weight[i]
        if best == nil or credit[i] > credit[best] then best = i end
      end
    end
    if best == nil then break end
    credit[best] = credit[best] - turn
    take[best] = take[best] + 1
    left = left - 1
  end
  local credits = {}
  for _, i in ipairs(active) do
    credits[#credits + 1] = 'credit:' .. (i - 1)
    credits[#credits + 1] = credit[i]
  end
  redis.call('HSET', KEYS[6], unpack(credits))
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[3]))
end
local taken = {}
for _, i in ipairs(active) do
  if take[i] > 0 then
    for _, message in ipairs(redis.call('RPOP', lanes[i], take[i])) do
      taken[#taken + 1] = message
    end
  end
end
if #taken == 0 then return {} end
local time = redis.call('TIME')
local now = string.format('%.6f', tonumber(time[1]) + tonumber(time[2]) / 1000000)
for _, message in ipairs(taken) do
  redis.call('ZADD', KEYS[2], now, message)
  redis.call('HSET', KEYS[3], message, ARGV[2])
end
redis.call('ZADD', KEYS[4], 'NX', now, ARGV[2])
redis.call('SADD', KEYS[5], KEYS[1])
for i = 2, 5 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3])) end
return taken
