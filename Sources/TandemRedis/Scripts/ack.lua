-- ack.lua — finish jobs: remove each one's lease and record, only for its current lease holder.
--
-- KEYS[1]   {tandem}:leases
-- ARGV      job id, fencing token — one pair per job (a worker acks the jobs whose results committed together)
-- Result    array, one per pair: 1 acked; 0 refused (stale token: the job was reclaimed and belongs to a newer
--           claim, or is gone)
--
-- Invariant: an ack carrying a stale token changes nothing, so a worker back from a freeze or a partition
-- cannot remove work its successor holds.
local p = '{tandem}'
local out = {}
local acked = 0
for i = 1, #ARGV - 1, 2 do
  local job = p .. ':job:' .. ARGV[i]
  local f = redis.call('HMGET', job, 'token', 'state')
  if f[1] == ARGV[i + 1] and f[2] == 'leased' then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('DEL', job)
    acked = acked + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if acked > 0 then redis.call('HINCRBY', p .. ':stats', 'acked', acked) end
return out
