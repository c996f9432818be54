-- replay.lua — send a dead-lettered message back through routing, as if Airflow had just published it.
--
-- KEYS[1]   {tandem}:dlq
-- ARGV[1]   job id
-- Result    1 replayed (the raw message is back at the FRONT of its ingress list); 0 not in the dead-letter queue
--
-- Invariant: the message leaves the dead-letter queue and enters its ingress list in one step, unchanged.
local p = '{tandem}'
local job = p .. ':job:' .. ARGV[1]
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
local f = redis.call('HMGET', job, 'raw', 'ingress')
if not f[1] then return 0 end
redis.call('RPUSH', f[2], f[1])
redis.call('DEL', job)
return 1
