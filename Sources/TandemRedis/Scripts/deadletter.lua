-- deadletter.lua — park a job that must never run (bad message) or cannot succeed, with its reason.
--
-- KEYS[1]   {tandem}:leases   KEYS[2] {tandem}:dlq
-- ARGV[1]   job id   ARGV[2] fencing token   ARGV[3] reason (one line a person can act on)
-- Result    1 dead-lettered; 0 refused (stale token)
--
-- Invariant: the message is kept verbatim (job hash, state "dead") with its reason and history; the lease and
-- the dead-letter entry change in one step, so the job is never both leased and dead, nor neither.
local p = '{tandem}'
local job = p .. ':job:' .. ARGV[1]
local f = redis.call('HMGET', job, 'token', 'state')
if f[1] ~= ARGV[2] or f[2] ~= 'leased' then return 0 end
local t = redis.call('TIME')
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', job, 'state', 'dead', 'reason', ARGV[3], 'dead_ms', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', p .. ':stats', 'dead', 1)
return 1
