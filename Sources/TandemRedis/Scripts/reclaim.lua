-- reclaim.lua — take back leases whose deadline has passed (their worker died, froze or was cut off).
--
-- KEYS[1]   {tandem}:leases   KEYS[2] {tandem}:dlq
-- ARGV[1]   max attempts (a job claimed this many times goes to the dead-letter queue instead)
-- ARGV[2]   max leases to reclaim in this call
-- Result    flat array, 3 fields per reclaimed job: job id, "requeued" | "dead", attempts
--
-- Invariant: only an EXPIRED lease (deadline < Redis TIME) is reclaimed; the job goes back to the FRONT of its
-- datacenter queue (or to the dead-letter queue) in the same step that drops the lease. The old token stays in
-- the hash until the next claim issues a newer one, so the old holder's ack/renew is refused from now on.
local p = '{tandem}'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local maxAttempts = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, jid in ipairs(expired) do
  local job = p .. ':job:' .. jid
  redis.call('ZREM', KEYS[1], jid)
  local f = redis.call('HMGET', job, 'state', 'dc', 'queue', 'attempts', 'owner')
  if f[1] == 'leased' then
    local attempts = tonumber(f[4]) or 0
    if attempts >= maxAttempts then
      redis.call('HSET', job, 'state', 'dead', 'dead_ms', now, 'owner', '',
        'reason', 'lease expired ' .. attempts .. ' times (last holder ' .. tostring(f[5]) ..
        '); max attempts ' .. maxAttempts .. ' reached — inspect with executorctl dlq show, replay with executorctl dlq replay')
      redis.call('LPUSH', KEYS[2], jid)
      redis.call('HINCRBY', p .. ':stats', 'dead', 1)
      out[#out + 1] = jid; out[#out + 1] = 'dead'; out[#out + 1] = attempts
    else
      redis.call('HSET', job, 'state', 'queued', 'owner', '', 'reclaimed_from', tostring(f[5]))
      redis.call('RPUSH', p .. ':q:' .. f[2] .. ':' .. f[3], jid)
      redis.call('LPUSH', p .. ':wake:' .. f[2], '1')
      redis.call('HINCRBY', p .. ':stats', 'reclaimed', 1)
      out[#out + 1] = jid; out[#out + 1] = 'requeued'; out[#out + 1] = attempts
    end
  end
end
return out
