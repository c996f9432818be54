-- ack.lua — finish jobs: remove each one's lease and record, only for its current lease holder.
--
-- KEYS[1]   {tandem}:leases
-- ARGV      job id, fencing token — one pair per job (a worker acks the jobs whose results committed together)
-- Result    array, one per pair: 1 acked; 2 acked late (the lease had expired and the job was back in its
--           queue, not yet claimed again: its queue entry is removed, so the finished task does not run a second
--           time); 0 refused (stale token: a newer claim holds the job, or it is gone)
--
-- Invariant: an ack carrying a stale token changes nothing, so a worker back from a freeze or a partition
-- cannot remove work its successor holds. The token changes only when a claim takes the job, so a job still
-- under the acking token has not started anywhere else: its task's finished run is the only one.
local p = '{tandem}'
local out = {}
local acked = 0
local late = 0
for i = 1, #ARGV - 1, 2 do
  local jid = ARGV[i]
  local job = p .. ':job:' .. jid
  local f = redis.call('HMGET', job, 'token', 'state', 'dc', 'queue')
  if f[1] == ARGV[i + 1] and f[2] == 'leased' then
    redis.call('ZREM', KEYS[1], jid)
    redis.call('DEL', job)
    acked = acked + 1
    out[#out + 1] = 1
  elseif f[1] == ARGV[i + 1] and f[2] == 'queued' then
    -- reclaimed (reclaim.lua, or given back) and waiting at or near the front of its queue (rebalance.lua keeps
    -- 'dc' current): scan from the front end
    redis.call('LREM', p .. ':q:' .. f[3] .. ':' .. f[4], -1, jid)
    redis.call('DEL', job)
    late = late + 1
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
if acked > 0 then redis.call('HINCRBY', p .. ':stats', 'acked', acked) end
if late > 0 then redis.call('HINCRBY', p .. ':stats', 'acked_late', late) end
return out
