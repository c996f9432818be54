-- handback.lua — give work Tandem holds back to Airflow's lists, untouched, for stock Celery workers (a rollback
-- to `airflow celery worker`, `executorctl handback`).
--
-- KEYS[1]   {tandem}:leases
-- KEYS[2..] datacenter queues {tandem}:q:<dc>:<queue> to empty
-- ARGV[1]   max messages to move in this call
-- ARGV[2..] ids of jobs whose lease looked expired, largest first (checked again here against Redis TIME)
-- Result    {dropped, kind, queue, kind, queue, ...}: per message moved, "queued" or "lease" and its Airflow queue;
--           dropped counts queue entries whose job hash was gone (nothing left to hand back).
--
-- Order: job ids grow in dispatch order, which is Airflow's list order. Moving the largest id first, each onto
-- the consuming end (RPUSH) of the list it came from, leaves the smallest (dispatched first) next in line for
-- kombu's BRPOP, ahead of anything Airflow published since.
--
-- Invariant: each message leaves Tandem and enters its Airflow list in one step, byte for byte as Airflow
-- published it (the raw kombu element in the job hash); a job under a live lease is never handed back.
local p = '{tandem}'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local max = tonumber(ARGV[1])
local out = {0}
local moved = 0
local li = 2

local function give(jid, kind)
  local job = p .. ':job:' .. jid
  local f = redis.call('HMGET', job, 'raw', 'ingress', 'queue')
  if not f[1] then return false end
  redis.call('RPUSH', f[2], f[1])
  redis.call('DEL', job)
  out[#out + 1] = kind
  out[#out + 1] = f[3]
  moved = moved + 1
  return true
end

while moved + out[1] < max do
  -- the newest job at the back of any datacenter queue
  local bestKey, bestID = nil, -1
  for i = 2, #KEYS do
    local back = redis.call('LINDEX', KEYS[i], 0)
    if back and (tonumber(back) or 0) > bestID then bestKey, bestID = KEYS[i], tonumber(back) or 0 end
  end
  -- leases already gone (acked, or moved by an earlier call) are passed over
  while li <= #ARGV and not redis.call('ZSCORE', KEYS[1], ARGV[li]) do li = li + 1 end
  local leaseID = li <= #ARGV and (tonumber(ARGV[li]) or 0) or -1
  if not bestKey and leaseID < 0 then break end
  if leaseID > bestID then
    local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[li]))
    if deadline < now then
      redis.call('ZREM', KEYS[1], ARGV[li])
      give(ARGV[li], 'lease')
    end
    li = li + 1
  else
    redis.call('LPOP', bestKey)
    if not give(tostring(bestID), 'queued') then out[1] = out[1] + 1 end
  end
end
return out
