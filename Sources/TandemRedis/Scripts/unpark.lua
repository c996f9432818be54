-- unpark.lua — the messages a dispatcher parked in a queue's staging list go back to Airflow's list
-- (`executorctl handback`), newest first onto its consuming end, so the oldest is next in line for kombu's BRPOP.
--
-- KEYS[1]   {tandem}:staging:<queue>        KEYS[2]  <queue> (kombu's plain list)
-- Result    how many moved
--
-- Invariant: each message leaves the staging list and enters Airflow's list in one step, unchanged. The first
-- write is an LPOP, which Redis allows at maxmemory, so this runs when Redis is full too (a plain LMOVE is refused
-- then, and a full Redis is a likely moment to roll back).
local moved = 0
while true do
  local m = redis.call('LPOP', KEYS[1])
  if not m then return moved end
  redis.call('RPUSH', KEYS[2], m)
  moved = moved + 1
end
