#!lua flags=allow-oom
-- (allow-oom, Redis 7: keeping leases, heartbeats, leadership and claims going when Redis is at its maxmemory, so a
-- full broker does not kill running tasks, declare datacenters lost, or stop the draining that frees memory.
-- Airflow's own publishes are still refused meanwhile: no new work enters.)
-- heartbeat.lua — a worker says it is alive, with its datacenter, slots and running tasks.
--
-- KEYS[1]   {tandem}:workers   sorted set: worker id -> last heartbeat (ms, Redis TIME)
-- KEYS[2]   {tandem}:worker:<id>   hash describing the worker
-- ARGV[1]   worker id   ARGV[2] dc   ARGV[3] slots total   ARGV[4] slots busy   ARGV[5] queues (comma-separated)
-- ARGV[6]   hostname    ARGV[7] pid  ARGV[8] running job ids (comma-separated)   ARGV[9] state (running|draining|stopped)
-- ARGV[10]  TTL of the worker hash in seconds (a worker gone for that long disappears from listings)
-- ARGV[11]  job ids claimed ahead, leased but not started (comma-separated; absent from workers before session 12)
-- ARGV[12]  writes waiting in the worker's local spool for Postgres (absent from workers before session 15)
-- ARGV[13]  the worker's Tandem version (absent before 0.17)
-- Result    Redis TIME in ms (the one clock every lease and heartbeat is measured with)
--
-- Invariant: liveness is measured on Redis's clock, never a host's, so skewed hosts cannot fake or miss a beat.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'dc', ARGV[2], 'slots', ARGV[3], 'busy', ARGV[4], 'queues', ARGV[5],
  'hostname', ARGV[6], 'pid', ARGV[7], 'running', ARGV[8], 'state', ARGV[9], 'seen_ms', now,
  'ahead', ARGV[11] or '', 'spooled', ARGV[12] or '0', 'version', ARGV[13] or '')
redis.call('HSETNX', KEYS[2], 'started_ms', now)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[10]))
return now
