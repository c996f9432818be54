#!lua flags=allow-oom
-- (allow-oom, Redis 7: keeping leases, heartbeats, leadership and claims going when Redis is at its maxmemory, so a
-- full broker does not kill running tasks, declare datacenters lost, or stop the draining that frees memory.
-- Airflow's own publishes are still refused meanwhile: no new work enters.)
-- renew.lua — extend the leases a worker still holds.
--
-- KEYS[1]   {tandem}:leases
-- ARGV[1]   worker id   ARGV[2] lease duration (ms)   ARGV[3..] pairs: job id, fencing token
-- Result    array of 1 (renewed) / 0 (refused: reclaimed, acked or owned by a newer token), one per pair
--
-- Invariant: only the current holder (same owner AND same token) extends a lease; a worker whose lease was
-- reclaimed learns it here and must stop the task (someone else may be running it).
local p = '{tandem}'
local t = redis.call('TIME')
local deadline = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 2 do
  local jid, token = ARGV[i], ARGV[i + 1]
  local job = p .. ':job:' .. jid
  local f = redis.call('HMGET', job, 'owner', 'token', 'state')
  if f[1] == ARGV[1] and f[2] == token and f[3] == 'leased' then
    redis.call('HSET', job, 'deadline_ms', deadline)
    redis.call('ZADD', KEYS[1], deadline, jid)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
