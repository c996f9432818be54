import Foundation
import Logging
import Redis
import TandemCore
import TandemRedis
import Testing
import TestSupport

/// Real swift-dispatcher and swift-worker processes: scrape /metrics during a run and check the figures against
/// what happened; /readyz follows Redis; --log-json lines carry the task's fields.
@Suite("Metrics and probes of real processes", .serialized)
struct MetricsProcessTests {
    let cluster: Cluster
    let redis: RedisClient

    init() async throws {
        cluster = try Cluster()
        redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
    }

    @discardableResult
    func submit(task: String, run: String) async throws -> String {
        try await publishAirflowCommand(redis, task: task, run: run)
    }

    func scrape(_ port: Int) async throws -> String {
        let r = try await get(port: port, "/metrics")
        #expect(r.status == 200)
        #expect(r.head.contains("text/plain; version=0.0.4"))
        return r.body
    }

    @Test("N tasks, one failing and one malformed message: tasks_total, dispatched, dead letters, histograms and gauges match")
    func figuresMatchTheRun() async throws {
        let dport = freeLoopbackPort()
        let wport = freeLoopbackPort()
        try cluster.startDispatcher(extra: ["--metrics-port", String(dport)])
        let worker = try cluster.startWorker(
            dc: "east", name: "east-1", extra: ["--concurrency", "3", "--metrics-port", String(wport), "--log-json"])
        let up = try await eventually(timeout: .seconds(20)) {
            let w = try? await get(port: wport, "/readyz").status
            let d = try? await get(port: dport, "/readyz").status
            return w == 200 && d == 200
        }
        #expect(up, "\(cluster.logs())")
        #expect(try await get(port: wport, "/healthz").status == 200)
        let before = try await scrape(wport)
        #expect(sample(before, "tandem_worker_slots") == 3)
        #expect(sample(before, "tandem_worker_info", ["dc": "east", "worker": "east-1", "version": TandemVersion.current]) == 1)
        #expect(sample(try await scrape(dport), "tandem_dispatcher_info", ["version": TandemVersion.current]) == 1)

        let n = 5
        for i in 0..<n { try await submit(task: "sleep-0.2", run: "m\(i)") }
        try await submit(task: "fail", run: "f0")
        _ = try await redis.send(["LPUSH", "default", "this is not a kombu envelope"])
        // a held task keeps a slot busy and a lease held while we look, however long the looking takes
        try await submit(task: "hold", run: "long")

        let done = try await eventually(timeout: .seconds(60)) {
            let t = try await scrape(wport)
            return total(t, "tandem_tasks_total", where: ["outcome": "SUCCESS"]) == Double(n)
                && total(t, "tandem_tasks_total", where: ["outcome": "FAILURE"]) >= 1
                && total(t, "tandem_dead_letters_total") == 1
                // the held task is claimed last (after the junk frees a slot), and a task's histograms follow its count
                && sample(t, "tandem_worker_slots_busy") == 1
                && sample(t, "tandem_task_queue_wait_seconds_count", ["dc": "east", "queue": "default"]) == Double(n + 1)
        }
        #expect(done, "\(cluster.logs())")
        let w = try await scrape(wport)
        #expect(sample(w, "tandem_tasks_total", ["outcome": "SUCCESS", "dc": "east", "queue": "default"]) == Double(n))
        // the malformed message has no task id: a dead letter, and a FAILURE only for the failing task
        #expect(sample(w, "tandem_tasks_total", ["outcome": "FAILURE", "dc": "east", "queue": "default"]) == 1)
        #expect(sample(w, "tandem_dead_letters_total", ["dc": "east", "queue": "default"]) == 1)
        #expect(sample(w, "tandem_task_run_seconds_count", ["dc": "east", "queue": "default"]) == Double(n + 1))
        #expect((sample(w, "tandem_task_run_seconds_sum", ["dc": "east", "queue": "default"]) ?? 0) >= 0.2 * Double(n))
        #expect(sample(w, "tandem_task_queue_wait_seconds_count", ["dc": "east", "queue": "default"]) == Double(n + 1))
        #expect(sample(w, "tandem_jobs_claimed_total", ["dc": "east"]) == Double(n + 3))
        #expect(sample(w, "tandem_worker_slots_busy") == 1, "the held task is still running")
        #expect(sample(w, "tandem_worker_phase", ["phase": "running"]) == 1)
        // the loop that starts and reaps every task keeps up (the worker's warning threshold is 5 s)
        let stall = sample(w, "tandem_worker_loop_stall_seconds")
        #expect(stall != nil && stall! < 5, "loop stall gauge: \(String(describing: stall))")
        #expect(sample(w, "tandem_redis_errors_total") == 0)
        // the broker's two connections (commands, blocking waits) and the Postgres one; none reopened
        #expect((sample(w, "tandem_redis_connects") ?? 0) >= 2)
        #expect((sample(w, "tandem_postgres_connects") ?? 0) >= 1)

        // the dispatcher's queue gauges are a snapshot taken every 0.5 s: wait for one taken after the run settled
        let settled = try await eventually(timeout: .seconds(10)) {
            let d = try await scrape(dport)
            return sample(d, "tandem_queue_in_flight", ["dc": "east", "queue": "default"]) == 1
                && sample(d, "tandem_queue_depth", ["dc": "east", "queue": "default"]) == 0
        }
        #expect(settled)
        let d = try await scrape(dport)
        #expect(total(d, "tandem_dispatched_total") == Double(n + 3))
        #expect(sample(d, "tandem_dispatched_total", ["queue": "default", "dc": "east"]) == Double(n + 3))
        #expect(sample(d, "tandem_datacenter_status", ["dc": "east", "status": "alive"]) == 1)
        #expect(sample(d, "tandem_datacenter_workers", ["dc": "east"]) == 1)
        #expect(sample(d, "tandem_datacenter_slots", ["dc": "east"]) == 3)
        #expect(sample(d, "tandem_queue_depth", ["dc": "east", "queue": "default"]) == 0)
        #expect(sample(d, "tandem_queue_in_flight", ["dc": "east", "queue": "default"]) == 1)
        #expect(sample(d, "tandem_reclaimed_total", ["disposition": "requeued"]) == 0)

        // leases are renewed while the held task runs (every 10 s by default is too slow to see: check after the run)
        try cluster.release(dag: "dag", run: "long")
        let released = try await eventually(timeout: .seconds(30)) {
            total(try await scrape(wport), "tandem_tasks_total", where: ["outcome": "SUCCESS"]) == Double(n + 1)
        }
        #expect(released, "the held task did not end after its release file was written")

        // every JSON log line about a task carries its fields
        let lines = worker.log().split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: String]
        }
        #expect(!lines.isEmpty, "--log-json printed no JSON lines:\n\(worker.log().prefix(2000))")
        let taskLines = lines.filter { $0["task_id"] != nil }
        #expect(!taskLines.isEmpty, "no log line carried task_id:\n\(worker.log().prefix(3000))")
        for l in taskLines {
            #expect(l["dc"] == "east" && l["queue"] == "default" && l["attempt"] == "1" && l["job"] != nil, "\(l)")
            #expect(l["level"] != nil && l["msg"] != nil && l["ts"] != nil && l["worker"] == "east-1")
        }
    }

    @Test("--claim-ahead: a job held behind a long task shows in tandem_worker_jobs_claimed_ahead, and its give-back after the hold limit in tandem_worker_claimed_ahead_given_back_total")
    func claimedAheadGaugeAndGiveBacks() async throws {
        let wport = freeLoopbackPort()
        _ = try await cluster.holdOneBehindALongTask(redis: redis, run: "ahead", extra: ["--metrics-port", String(wport)])
        // the hold runs and the ok waits, claimed ahead, until the 2 s hold limit gives it back
        let heldAhead = try await eventually(timeout: .seconds(30)) {
            let m = try await scrape(wport)
            return sample(m, "tandem_worker_slots_busy") == 1 && sample(m, "tandem_worker_jobs_claimed_ahead") == 1
                && sample(m, "tandem_worker_claimed_ahead_given_back_total") == 0
        }
        #expect(heldAhead, "\(cluster.logs())")
        let givenBack = try await eventually(timeout: .seconds(30)) {
            let m = try await scrape(wport)
            return sample(m, "tandem_worker_claimed_ahead_given_back_total") == 1
                && sample(m, "tandem_worker_jobs_claimed_ahead") == 0
        }
        #expect(givenBack, "\(cluster.logs())")
        // the counter moves as the give-back starts; the job reaches its queue a round trip later
        let backInQueue = try await eventually(timeout: .seconds(20)) {
            try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 1
        }
        #expect(backInQueue, "the held job was never back in its queue: \(cluster.logs())")
        try cluster.release(dag: "dag", run: "ahead")
    }

    @Test("a task for a queue no worker serves is named (dispatcher log, tandem_ingress_stranded) and runs once a worker serves it")
    func strandedWorkIsNamed() async throws {
        let dport = freeLoopbackPort()
        try cluster.startWorker(dc: "east", name: "east-1")
        try await submit(task: "ok", run: "served")
        try await publishAirflowCommand(redis, task: "ok", run: "gpu-run", queue: "gpu")
        let dispatcher = try cluster.startDispatcher(extra: ["--metrics-port", String(dport)])
        let named = try await eventually(timeout: .seconds(30)) {
            guard let m = try? await scrape(dport) else { return false }  // not listening yet
            return sample(m, "tandem_ingress_stranded", ["queue": "gpu"]) == 1
                && sample(m, "tandem_ingress_waiting", ["queue": "gpu"]) == 1
                && sample(m, "tandem_ingress_stranded", ["queue": "default"]) == 0
                && (sample(m, "tandem_redis_memory_used_bytes") ?? 0) > 0 && sample(m, "tandem_redis_memory_max_bytes") == 0
                && dispatcher.log().contains("--queues gpu")
        }
        #expect(named, "\(cluster.logs())")
        #expect(dispatcher.log().contains("1 message(s) wait in Airflow's list for queue 'gpu' and nothing can take them: no live worker serves queue 'gpu'"))
        #expect(!dispatcher.log().contains("queue 'default' and nothing"))
        // served: it runs, and the dispatcher says the queue is clear (its next look, within 10 s)
        try cluster.startWorker(dc: "east", name: "east-gpu", extra: ["--queues", "gpu"])
        let cleared = try await eventually(timeout: .seconds(40)) {
            let m = try await scrape(dport)
            return sample(m, "tandem_ingress_stranded", ["queue": "gpu"]) == 0
                && dispatcher.log().contains("queue 'gpu' is no longer stranded")
        }
        #expect(cleared, "\(cluster.logs())")
        let ran = try await eventually(timeout: .seconds(30)) {
            let gpuLeft = try await redis.send(["LLEN", "gpu"]).int
            return gpuLeft == 0 && cluster.taskEvents().filter { $0.event == "end" }.count == 2
        }
        #expect(ran, "\(cluster.logs())")

        // Redis near its maxmemory: the leader says so once (its next look, within 10 s), and once when it is not
        let memory = try await redis.send(["INFO", "memory"]).string ?? ""
        let used = Double(memory.split(whereSeparator: \.isNewline).first { $0.hasPrefix("used_memory:") }?.dropFirst(12) ?? "") ?? 0
        _ = try await redis.send(["CONFIG", "SET", "maxmemory", String(Int(used * 1.06))])
        let warned = try await eventually(timeout: .seconds(30)) { dispatcher.log().contains("Redis is at ") }
        _ = try await redis.send(["CONFIG", "SET", "maxmemory", "0"])
        #expect(warned, "\(dispatcher.log())")
        #expect(dispatcher.log().contains("maxmemory (9") && dispatcher.log().contains("refuses Airflow's publishes"), "\(dispatcher.log())")
        let eased = try await eventually(timeout: .seconds(30)) { dispatcher.log().contains("Redis memory is below 90% of maxmemory again") }
        #expect(eased, "\(dispatcher.log())")
    }

    @Test("/readyz answers 503 with a reason once Redis is gone; /healthz stays 200")
    func readinessFollowsRedis() async throws {
        let dport = freeLoopbackPort()
        let wport = freeLoopbackPort()
        try cluster.startDispatcher(extra: ["--metrics-port", String(dport)])
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--metrics-port", String(wport)])
        let up = try await eventually(timeout: .seconds(20)) {
            let w = try? await get(port: wport, "/readyz").status
            let d = try? await get(port: dport, "/readyz").status
            return w == 200 && d == 200
        }
        #expect(up, "\(cluster.logs())")
        cluster.redis.stop()
        let down = try await eventually(timeout: .seconds(20)) {
            let w = try? await get(port: wport, "/readyz").status
            let d = try? await get(port: dport, "/readyz").status
            return w == 503 && d == 503
        }
        #expect(down, "\(cluster.logs())")
        let r = try await get(port: wport, "/readyz")
        #expect(r.body.hasPrefix("not ready: Redis unreachable"), "\(r.body)")
        #expect(r.body.split(separator: "\n").count == 1)
        #expect(try await get(port: wport, "/healthz").status == 200)
        #expect(try await get(port: dport, "/healthz").status == 200)
        let m = try await scrape(wport)
        #expect((sample(m, "tandem_redis_errors_total") ?? 0) >= 1)
    }
}
