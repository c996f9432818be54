-- rebalance.lua — move queued (not leased) jobs of one datacenter queue to another datacenter's queue.
--
-- KEYS[1]   {tandem}:q:<from-dc>:<queue>   KEYS[2] {tandem}:q:<to-dc>:<queue>
-- ARGV[1]   destination datacenter   ARGV[2] max jobs   ARGV[3] leader epoch or ""
-- Result    number of jobs moved
--
-- Invariant: order is kept — the oldest job of the source ends at the FRONT of the destination, ahead of the
-- destination's own backlog (drained work has waited longest). Each job's dc field changes in the same step.
local p = '{tandem}'
if ARGV[3] ~= '' then
  local epoch = redis.call('HGET', p .. ':leader', 'epoch')
  if epoch ~= ARGV[3] then
    return redis.error_reply('FENCED dispatcher epoch ' .. ARGV[3] .. ' is not the leader epoch ' .. tostring(epoch))
  end
end
local max = tonumber(ARGV[2])
local moved = 0
-- RPOP with a count returns the oldest first; pushing them back-to-front keeps the oldest at the destination's
-- right (front) end.
local batch = redis.call('RPOP', KEYS[1], max)
if not batch then return 0 end
for i = #batch, 1, -1 do
  local jid = batch[i]
  -- an id whose job is gone (acked late, ack.lua, with its queue entry missed) is dropped, never given a bare hash
  if redis.call('EXISTS', p .. ':job:' .. jid) == 1 then
    redis.call('HSET', p .. ':job:' .. jid, 'dc', ARGV[1])
    redis.call('RPUSH', KEYS[2], jid)
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('SADD', p .. ':queues', ARGV[1] .. '\t' .. string.match(KEYS[2], '^{tandem}:q:[^:]+:(.*)$'))
  redis.call('LPUSH', p .. ':wake:' .. ARGV[1], '1')
end
return moved
