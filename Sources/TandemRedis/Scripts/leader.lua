#!lua flags=allow-oom
-- (allow-oom, Redis 7: keeping leases, heartbeats, leadership and claims going when Redis is at its maxmemory, so a
-- full broker does not kill running tasks, declare datacenters lost, or stop the draining that frees memory.
-- Airflow's own publishes are still refused meanwhile: no new work enters.)
-- leader.lua — take or keep dispatcher leadership: a Redis lease with a fencing epoch.
--
-- KEYS[1]   {tandem}:leader   hash: owner, epoch, deadline_ms, since_ms
-- ARGV[1]   candidate dispatcher id   ARGV[2] lease duration (ms)   ARGV[3] "1" to step down (release) instead
-- Result    {epoch, owner, deadline_ms, 1 if the candidate leads now else 0}
--
-- Invariant: one leader at a time. A new leader always takes a NEW epoch (HINCRBY), and dispatch.lua and
-- rebalance.lua refuse any other epoch, so a deposed leader that wakes up cannot move anything.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local h = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'deadline_ms')
local owner, epoch, deadline = h[1], tonumber(h[2]) or 0, tonumber(h[3]) or 0
if ARGV[3] == '1' then
  if owner == ARGV[1] then redis.call('HSET', KEYS[1], 'deadline_ms', 0) end
  return {epoch, tostring(owner), 0, 0}
end
local ttl = tonumber(ARGV[2])
if owner == ARGV[1] and deadline >= now then
  redis.call('HSET', KEYS[1], 'deadline_ms', now + ttl)
  return {epoch, owner, now + ttl, 1}
end
if not owner or owner == '' or deadline < now then
  epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'deadline_ms', now + ttl, 'since_ms', now)
  return {epoch, ARGV[1], now + ttl, 1}
end
return {epoch, owner, deadline, 0}
