-- Push one run's messages on a stage queue, in that run's lane: a lane of its own while an
-- empty one is left, so the claims (claim.lua) and Celery's consumer can take the runs in turn.
-- KEYS: map, priority, lane0, lane1, lane2, lane3, lane4, lane5, lane6, lane7, lane8, lane9
--   map: the queue's lane map (run:LANE -> run id, weight:LANE, credit:LANE);
--   priority: the run's priority, the lane's weight (1 when unset);
--   lane0..lane9: the queue's lanes, kombu's priority steps (lane0 is kombu's own list)
-- ARGV: [1] run id, [2] ttl_s of the map, [3..] the messages (at most a few thousand)
-- The run keeps the lane it has; else it takes the first empty lane (lane 0 on a quiet
-- queue: one run at a time queues as it always did); with every lane busy it shares the
-- shortest. Consumers pop from the right, so LPUSH keeps each lane FIFO.
-- Returns the lane.
local lanes = #KEYS - 2
local fields = {}
for i = 0, lanes - 1 do fields[i + 1] = 'run:' .. i end
local occupants = redis.call('HMGET', KEYS[1], unpack(fields))
local lane
for i = 0, lanes - 1 do
  if occupants[i + 1] == ARGV[1] then lane = i break end
end
if lane == nil then
  local shortest, shortest_lane
  for i = 0, lanes - 1 do
    local waiting = redis.call('LLEN', KEYS[3 + i])
    if waiting == 0 then lane = i break end
    if shortest == nil or waiting < shortest then shortest, shortest_lane = waiting, i end
  end
  if lane == nil then
    lane = shortest_lane
  else
    local weight = tonumber(redis.call('GET', KEYS[2])) or 1
    redis.call('HSET', KEYS[1], 'run:' .. lane, ARGV[1], 'weight:' .. lane, weight,
               'credit:' .. lane, 0)
  end
end
redis.call('LPUSH', KEYS[3 + lane], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return lane
