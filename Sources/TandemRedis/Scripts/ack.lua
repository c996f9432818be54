-- ack.lua — finish a job: remove its lease and its record, only for the current lease holder.
--
-- KEYS[1]   {tandem}:leases
-- ARGV[1]   job id   ARGV[2] fencing token
-- Result    1 acked; 0 refused (stale token: the job was reclaimed and belongs to a newer claim, or is gone)
--
-- Invariant: an ack carrying a stale token changes nothing, so a worker back from a freeze or a partition
-- cannot remove work its successor holds.
local p = '{tandem}'
local job = p .. ':job:' .. ARGV[1]
local f = redis.call('HMGET', job, 'token', 'state')
if f[1] ~= ARGV[2] or f[2] ~= 'leased' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', job)
redis.call('HINCRBY', p .. ':stats', 'acked', 1)
return 1
