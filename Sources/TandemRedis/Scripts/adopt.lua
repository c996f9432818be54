-- adopt.lua — restore one message a stock Celery worker reserved and never acked (kombu's `unacked` hash) to its
-- Airflow list, exactly as kombu's own restore does, so Tandem's dispatcher takes it (`executorctl adopt`).
--
-- KEYS[1]   unacked          KEYS[2] unacked_index          KEYS[3] unacked_mutex
-- KEYS[4..] the lists to restore to (kombu's lookup of the message's exchange and routing key, priority sibling)
-- ARGV[1]   delivery tag     ARGV[2] the hash value as read  ARGV[3] the element to push (redelivered marked)
-- Result    1 restored; 0 the entry changed or is gone (a Celery worker acked or restored it meanwhile);
--           -1 kombu's restore mutex is held (a Celery worker is restoring right now: try again later)
--
-- Invariant: as kombu's restore_by_tag (one MULTI/EXEC), the entry leaves the hash and enters its lists in one
-- step; an entry a Celery worker touched since it was read is left to that worker.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 4, #KEYS do redis.call('RPUSH', KEYS[i], ARGV[3]) end
return 1
