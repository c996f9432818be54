#!lua flags=allow-oom
-- (allow-oom, Redis 7: keeping leases, heartbeats, leadership and claims going when Redis is at its maxmemory, so a
-- full broker does not kill running tasks, declare datacenters lost, or stop the draining that frees memory.
-- Airflow's own publishes are still refused meanwhile: no new work enters.)
-- claim.lua — claim up to N jobs from a worker's datacenter queues, recording the lease in the same step.
--
-- KEYS[1]   {tandem}:leases               sorted set: job id -> lease deadline (ms, Redis TIME)
-- KEYS[2..] {tandem}:q:<dc>:<queue>        the queues to claim from, in the order to try them
-- KEYS[n-2] {tandem}:revoked              sorted set: revoked task id -> expiry (ms)
-- KEYS[n-1] {tandem}:refill               hash: datacenter queue key -> the depth at or below which the
--                                         dispatcher wants waking to refill it (absent: wake on every claim)
-- KEYS[n]   {tandem}:worker:<id>          the worker's hash: 'claimed' (jobs claimed by this incarnation, kept
--                                         here) and 'released' (how many of them have freed their slot, reported
--                                         by the worker); the dispatcher reads busy = claimed - released
-- ARGV[1]   worker id   ARGV[2] lease duration (ms)   ARGV[3] max jobs to claim (0: only report `released`)
-- ARGV[4]   released (jobs of this incarnation whose slot is free again)   ARGV[5] incarnation (per process)
-- ARGV[6]   claim id ('' for none): the same id again is a retry of a claim whose reply was lost; it answers
--           the jobs that claim took (still leased to this worker, under the same tokens, leases renewed)
--           instead of taking more, so they run now rather than after their leases expire
-- Result    flat array, 9 fields per claimed job:
--           job id, fencing token, attempts (after this claim), raw message, ingress list, queue, dc,
--           dispatched_ms, deadline_ms
--           then one more field: how many revokes are in force now (0 lets the worker skip its revoke check)
--
-- Invariant: a job leaves its queue only together with its lease (owner, a fencing token that only grows — a
-- counter floored at Redis TIME in microseconds — and a deadline from Redis TIME). A worker that dies after this script returns loses nothing: the
-- lease expires and reclaim.lua puts the job back.
local p = '{tandem}'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local deadline = now + tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local out = {}
local n = 0
-- Fencing tokens must keep growing even across a Sentinel failover that loses the newest counter writes
-- (asynchronous replication): each token is at least Redis TIME in microseconds, so a promoted replica whose
-- counter lags still issues tokens above every token the old master handed out before it died.
local function nextToken()
  local floor = t[1] * 1000000 + t[2]
  local c = tonumber(redis.call('GET', p .. ':fence')) or 0
  -- formatted with %d: Lua would print a 16-digit number as 1.7e+15 when passing it to Redis
  local token = string.format('%d', math.max(c + 1, floor))
  redis.call('SET', p .. ':fence', token)
  return token
end
-- One claimed job into the reply: its 9 fields, in the order the header gives.
local function answer(jid, token, attempts)
  local f = redis.call('HMGET', p .. ':job:' .. jid, 'raw', 'ingress', 'queue', 'dc', 'dispatched_ms')
  for _, v in ipairs({jid, token, attempts, f[1], f[2], f[3], f[4], f[5], deadline}) do
    out[#out + 1] = v
  end
end
local wake = false
-- Slot accounting for the dispatcher: counted here, in the step that takes the jobs, so a claim is never missed;
-- a worker process that starts again under the same id starts from zero.
local wkey = KEYS[#KEYS]
local released = tonumber(ARGV[4])
local freed = false
if redis.call('HGET', wkey, 'incarnation') ~= ARGV[5] then
  redis.call('HSET', wkey, 'incarnation', ARGV[5], 'claimed', 0, 'released', released)
  freed = released > 0
elseif released > (tonumber(redis.call('HGET', wkey, 'released')) or 0) then
  redis.call('HSET', wkey, 'released', released)
  freed = true
end
local cid = ARGV[6] or ''
if cid ~= '' then
  local last = redis.call('HMGET', wkey, 'claim_id', 'claim_jobs')
  if last[1] == cid then
    for entry in string.gmatch(last[2] or '', '[^,]+') do
      local jid, token = string.match(entry, '^(.*)=(%d+)$')
      local job = p .. ':job:' .. jid
      local f = redis.call('HMGET', job, 'owner', 'token', 'state', 'attempts')
      if f[1] == ARGV[1] and f[2] == token and f[3] == 'leased' then
        redis.call('HSET', job, 'deadline_ms', deadline)
        redis.call('ZADD', KEYS[1], deadline, jid)
        answer(jid, token, tonumber(f[4]))
      end
    end
    out[#out + 1] = redis.call('ZCOUNT', KEYS[#KEYS - 2], now, '+inf')
    return out
  end
end
local taken = {}
for i = 2, #KEYS - 3 do
  local before = n
  while n < max do
    local jid = redis.call('RPOP', KEYS[i])
    if not jid then break end
    local job = p .. ':job:' .. jid
    if redis.call('EXISTS', job) == 1 then
      local token = nextToken()
      local attempts = redis.call('HINCRBY', job, 'attempts', 1)
      redis.call('HSET', job, 'owner', ARGV[1], 'token', token, 'deadline_ms', deadline,
        'claimed_ms', now, 'state', 'leased', 'claimed_from', KEYS[i])
      redis.call('ZADD', KEYS[1], deadline, jid)
      answer(jid, token, attempts)
      n = n + 1
      taken[n] = jid .. '=' .. token
    end
  end
  if (n > before or freed) and not wake then
    local mark = redis.call('HGET', KEYS[#KEYS - 1], KEYS[i])
    wake = (not mark) or redis.call('LLEN', KEYS[i]) <= tonumber(mark)
  end
end
if n > 0 then
  redis.call('HINCRBY', wkey, 'claimed', n)
  if cid ~= '' then redis.call('HSET', wkey, 'claim_id', cid, 'claim_jobs', table.concat(taken, ',')) end
end
if wake then
  -- room appeared (jobs taken, or slots freed): wake a dispatcher that has work waiting and was out of room (one
  -- token is enough); only once the queue is down to its refill mark, so under a backlog the dispatcher wakes
  -- once per several claims
  redis.call('LPUSH', p .. ':capacity', '1')
  redis.call('LTRIM', p .. ':capacity', 0, 0)
end
out[#out + 1] = redis.call('ZCOUNT', KEYS[#KEYS - 2], now, '+inf')
return out
