-- requeue.lua — give a claimed job back (graceful shutdown, worker cannot run it now).
--
-- KEYS[1]   {tandem}:leases
-- ARGV[1]   job id   ARGV[2] fencing token   ARGV[3] "1" to refund the attempt (the task never started)
-- Result    1 requeued at the FRONT of its datacenter queue; 0 refused (stale token)
--
-- Invariant: the job moves from its lease back to the queue in one step; only the lease holder may do it.
local p = '{tandem}'
local job = p .. ':job:' .. ARGV[1]
local f = redis.call('HMGET', job, 'token', 'state', 'dc', 'queue')
if f[1] ~= ARGV[2] or f[2] ~= 'leased' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', job, 'state', 'queued', 'owner', '')
if ARGV[3] == '1' then redis.call('HINCRBY', job, 'attempts', -1) end
redis.call('RPUSH', p .. ':q:' .. f[3] .. ':' .. f[4], ARGV[1])
redis.call('LPUSH', p .. ':wake:' .. f[3], '1')
redis.call('LTRIM', p .. ':wake:' .. f[3], 0, 255)
return 1
