-- store_result.lua — write a Celery result record for the Redis result backend, the way Celery's own
-- RedisBackend does (SETEX + PUBLISH on celery-task-meta-<id>), with two guards Celery lacks.
--
-- KEYS[1]   celery-task-meta-<task id>
-- KEYS[2]   {tandem}:job:<job id> on the SAME server, or absent when the result backend is another Redis
-- ARGV[1]   the JSON record   ARGV[2] TTL seconds   ARGV[3] the writer's fencing token (used with KEYS[2])
-- Result    1 written; 0 kept the existing SUCCESS; -1 refused (stale fencing token)
--
-- Invariant: a SUCCESS is never overwritten, and when the broker and the backend share a server a worker
-- whose lease was reclaimed cannot write a result at all.
if KEYS[2] then
  local token = redis.call('HGET', KEYS[2], 'token')
  if token ~= ARGV[3] then return -1 end
end
local old = redis.call('GET', KEYS[1])
if old and string.find(old, '"status": *"SUCCESS"') then return 0 end
redis.call('SETEX', KEYS[1], tonumber(ARGV[2]), ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
