-- dispatch.lua — move Celery messages from the kombu ingress lists into one datacenter queue.
--
-- KEYS[1]   {tandem}:q:<dc>:<queue>     the datacenter queue (list of job ids; LPUSH = back, RPOP = front)
-- KEYS[2..] where messages of <queue> wait, in order: {tandem}:staging:<queue> (where an idle dispatcher's
--           BLMOVE parked the oldest plain message), then the kombu ingress lists in kombu's consume order on
--           Redis: "<queue>", "<queue>\x06\x163", "<queue>\x06\x166", "<queue>\x06\x169"
-- ARGV[1]   datacenter name            ARGV[2]  Airflow queue name (ingress list without priority suffix)
-- ARGV[3]   max messages to move       ARGV[4]  leader epoch, or "" when no leadership is in force
-- Result    number of messages moved; error "FENCED ..." when ARGV[4] is not the current leader epoch.
--
-- Invariant: every message is in exactly one place. RPOP from an ingress list and the job hash + LPUSH onto the
-- datacenter queue happen in this one script, so no crash can lose a message between the two (kombu's own
-- BRPOP-then-record-unacked has exactly that window). The raw kombu element is kept verbatim in the job hash.
local p = '{tandem}'
if ARGV[4] ~= '' then
  local epoch = redis.call('HGET', p .. ':leader', 'epoch')
  if epoch ~= ARGV[4] then
    return redis.error_reply('FENCED dispatcher epoch ' .. ARGV[4] .. ' is not the leader epoch ' .. tostring(epoch))
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local max = tonumber(ARGV[3])
local moved = 0
for i = 2, #KEYS do
  while moved < max do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local jid = redis.call('INCR', p .. ':seq')
    redis.call('HSET', p .. ':job:' .. jid,
      'raw', raw, 'ingress', (i == 2 and ARGV[2] or KEYS[i]), 'queue', ARGV[2], 'dc', ARGV[1],
      'dispatched_ms', now, 'attempts', 0, 'state', 'queued')
    redis.call('LPUSH', KEYS[1], jid)
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('SADD', p .. ':queues', ARGV[1] .. '\t' .. ARGV[2])
  -- wake tokens let idle workers block on BLPOP instead of polling; losing one only costs a poll interval
  local wake = p .. ':wake:' .. ARGV[1]
  for _ = 1, math.min(moved, 64) do redis.call('LPUSH', wake, '1') end
  redis.call('LTRIM', wake, 0, 255)
end
return moved
