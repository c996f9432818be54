-- purge.lua — delete a dead-lettered message for good (an operator decided it must never run).
--
-- KEYS[1]   {tandem}:dlq
-- ARGV[1]   job id
-- Result    1 deleted; 0 not in the dead-letter queue
--
-- Invariant: only dead-lettered jobs can be purged; queued and leased work is never deleted by an operator.
local p = '{tandem}'
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', p .. ':job:' .. ARGV[1])
return 1
