import CeleryWire
import Foundation
import Logging
import Postgres
import Redis
import TandemCore
import TandemRedis
import Testing
import TestSupport

/// Real swift-dispatcher and swift-worker processes against real Redis and Postgres, with a stand-in `airflow`
/// that records every start and any concurrent duplicate. These are the kill -9 / SIGTERM / bad-input tests.
@Suite("Worker and dispatcher processes", .serialized)
struct WorkerProcessTests {
    let cluster: Cluster
    let redis: RedisClient
    let pg: PostgresClient

    init() async throws {
        cluster = try Cluster()
        redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "t"))
    }

    /// Publishes `airflow tasks run <dag> <task> <run>` as the stock Celery client would; returns the task id.
    @discardableResult
    func submit(task: String, run: String, dag: String = "dag", queue: String = "default", soft: Double? = nil,
        hard: Double? = nil) async throws -> String
    {
        try await publishAirflowCommand(redis, dag: dag, task: task, run: run, queue: queue, soft: soft, hard: hard)
    }

    /// celery_taskmeta status by task id (absent: not written yet).
    func states(_ ids: [String]) async throws -> [String: String] { try await celeryStates(pg, ids) }

    func waitForFinal(_ ids: [String], timeout: Duration = .seconds(90)) async throws -> [String: String] {
        try await waitForCeleryFinal(pg, ids, timeout: timeout)
    }

    func ledger(_ id: String) async throws -> (dc: String, attempts: Int64, outcome: String?)? {
        let r = try await pg.query("SELECT datacenter, attempts, outcome FROM tandem_tasks WHERE task_id = $1", [.text(id)])
        return r.rows.first.map { ($0.string("datacenter") ?? "", $0.int("attempts") ?? 0, $0.string("outcome")) }
    }

    @Test("tasks published to 'default' are routed to both datacenters, run once each, and recorded")
    func routesRunsAndRecords() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "4"])
        try cluster.startWorker(dc: "west", name: "west-1", extra: ["--concurrency", "4"])
        var ok: [String] = []
        var failing: [String] = []
        // both workers heartbeating, so the first batch is spread
        let inspector = BrokerInspector(client: redis)
        let bothUp = try await eventually(timeout: .seconds(30)) {
            try await inspector.datacenters(lossAfterMs: 15000).filter { $0.status == .alive && $0.slots > 0 }.count == 2
        }
        #expect(bothUp, "\(cluster.logs())")
        try await Task.sleep(for: .seconds(1))  // the dispatcher's own look at the heartbeats comes within a second
        for i in 0..<16 { ok.append(try await submit(task: "sleep-0.3", run: "r\(i)")) }
        for i in 0..<2 { failing.append(try await submit(task: "fail", run: "f\(i)")) }
        let s = try await waitForFinal(ok + failing)
        #expect(ok.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        #expect(failing.allSatisfy { s[$0] == "FAILURE" })
        let events = cluster.taskEvents()
        #expect(!events.contains { $0.event == "DUPLICATE" })
        #expect(events.filter { $0.event == "start" }.count == 18)
        // every run carried its Celery task id as external_executor_id
        #expect(Set(events.filter { $0.event == "start" }.map(\.executorID)) == Set(ok + failing))
        var dcs = Set<String>()
        for id in ok + failing {
            let l = try #require(try await ledger(id))
            dcs.insert(l.dc)
            #expect(l.attempts == 1)
            #expect(l.outcome == s[id])
        }
        #expect(dcs == ["east", "west"], "work should be spread across both datacenters")
        // FAILURE rows carry a NULL result (Airflow's DB fetcher breaks on anything else under celery 5.7)
        let nulls = try await pg.query("SELECT count(*) AS n FROM celery_taskmeta WHERE status = 'FAILURE' AND result IS NULL")
        #expect(nulls.rows.first?.int("n") == 2)
    }

    @Test("a job never waits behind a datacenter's busy slot while the other datacenter has an idle one")
    func noWaitBehindBusySlots() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1"])
        try cluster.startWorker(dc: "west", name: "west-1", extra: ["--concurrency", "1"])
        try await Task.sleep(for: .seconds(2))  // both workers heartbeat
        // a held task takes one datacenter's only slot, for as long as this test wants
        let held = try await submit(task: "hold", run: "h")
        let holding = try await eventually(timeout: .seconds(30)) {
            cluster.taskEvents().contains { $0.event == "start" && $0.key == "dag.hold.h" }
        }
        #expect(holding, "\(cluster.logs())")
        // quick tasks, all at once: each must run in the other datacenter's slot, one after another, none queued
        // behind the held one (which ends only when released below)
        var quick: [String] = []
        for i in 0..<5 { quick.append(try await submit(task: "ok", run: "q\(i)")) }
        let s = try await waitForFinal(quick, timeout: .seconds(60))
        #expect(quick.allSatisfy { s[$0] == "SUCCESS" }, "quick tasks waited behind the held one: \(s)\n\(cluster.logs())")
        #expect(try await eventually(timeout: .seconds(30)) { try await ledger(held) != nil })
        let heldDC = try #require(try await ledger(held)).dc
        for id in quick { #expect(try await ledger(id)?.dc != heldDC) }
        #expect(try await states([held])[held] == "STARTED", "the held task is still running")
        try cluster.release(dag: "dag", run: "h")
        #expect(try await waitForFinal([held])[held] == "SUCCESS")
    }

    /// `Cpus_allowed_list` of a process or one of its threads ("0", "0-1", …).
    static func allowedCPUs(_ path: String) -> String? {
        guard let text = try? String(contentsOfFile: path + "/status", encoding: .utf8) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
            .map { $0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces) }
    }

    @Test("--pin-cpu: every worker thread on that CPU, its task processes on every CPU the worker was given; a CPU it cannot use is refused")
    func pinnedWorkerThreads() async throws {
        let mine = try #require(Self.allowedCPUs("/proc/self"))
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--pin-cpu", "0"])
        let held = try await submit(task: "hold", run: "p")
        #expect(try await eventually(timeout: .seconds(30)) {
            cluster.taskEvents().contains { $0.event == "start" && $0.key == "dag.hold.p" }
        }, "\(cluster.logs())")
        let threads = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(w.pid)/task")
        #expect(threads.count > 1)
        for t in threads {
            #expect(Self.allowedCPUs("/proc/\(w.pid)/task/\(t)") == "0", "worker thread \(t) is not pinned")
        }
        // the fake airflow logs "start KEY EXECUTOR_ID PID TIME"
        let log = try String(contentsOfFile: cluster.fakeLog, encoding: .utf8)
        let line = try #require(log.split(separator: "\n").first { $0.hasPrefix("start dag.hold.p ") })
        let taskPID = try #require(Int32(line.split(separator: " ")[3]))
        #expect(Self.allowedCPUs("/proc/\(taskPID)") == mine, "the task process must get every CPU back")
        try cluster.release(dag: "dag", run: "p")
        #expect(try await waitForFinal([held])[held] == "SUCCESS")

        let bad = try cluster.startWorker(dc: "east", name: "east-bad", extra: ["--pin-cpu", "4096"])
        let code = await bad.waitForExit(timeout: .seconds(20))
        #expect(code == 64, "\(bad.log())")
        #expect(bad.log().contains("--pin-cpu 4096: CPU 4096 is not one this process may run on"), "\(bad.log())")

        var env = cluster.environment
        env["TANDEM_PIN_CPU"] = "first"
        let typo = try TandemProcess(
            "swift-worker", ["--dc", "east", "--worker-id", "east-typo"], environment: env, logDir: cluster.dir, name: "east-typo")
        #expect(await typo.waitForExit(timeout: .seconds(20)) == 64, "\(typo.log())")
        #expect(typo.log().contains("TANDEM_PIN_CPU=first is not a CPU number"), "\(typo.log())")
    }

    @Test("worker and dispatcher ignore SIGPIPE, so a write to a connection the server reset fails with EPIPE (and the client reconnects) instead of killing the process")
    func brokenPipesDoNotKill() async throws {
        let d = try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1")
        func ignored(_ pid: Int32) -> Bool? {
            guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
                let line = text.split(separator: "\n").first(where: { $0.hasPrefix("SigIgn:") }),
                let mask = UInt64(line.split(separator: "\t").last ?? "", radix: 16)
            else { return nil }
            return mask & (1 << UInt64(SIGPIPE - 1)) != 0
        }
        // (the handlers are installed once each process has parsed its flags and connected)
        let both = try await eventually(timeout: .seconds(20)) { ignored(d.pid) == true && ignored(w.pid) == true }
        #expect(both, "SigIgn of dispatcher \(String(describing: ignored(d.pid))), worker \(String(describing: ignored(w.pid)))")
    }

    @Test("a negative prefetch is refused at start-up with the flag to fix")
    func negativePrefetchRefused() async throws {
        let d = try cluster.startDispatcher(extra: ["--prefetch-limit=-1"])
        let code = await d.waitForExit(timeout: .seconds(20))
        #expect(code == 64, "\(d.log())")
        #expect(d.log().contains("--prefetch-window and --prefetch-limit cannot be negative"), "\(d.log())")
    }

    @Test("a loss threshold under a heartbeat and a half is refused at start-up, saying the least to use")
    func lossThresholdBelowTheHeartbeatRefused() async throws {
        let d = try cluster.startDispatcher(extra: ["--dc-loss-after", "2"])
        let code = await d.waitForExit(timeout: .seconds(20))
        #expect(code == 64, "\(d.log())")
        #expect(d.log().contains("--dc-loss-after 2 is too short: workers heartbeat every 2 s"), "\(d.log())")
        #expect(d.log().contains("Use at least 3"), "\(d.log())")
        let nan = try cluster.startDispatcher(name: "dispatcher-nan", extra: ["--dc-loss-after", "nan"])
        #expect(await nan.waitForExit(timeout: .seconds(20)) == 64, "\(nan.log())")
        #expect(nan.log().contains("--dc-loss-after, --leader-lease and --prefetch-window take a number of seconds"), "\(nan.log())")
        let ok = try cluster.startDispatcher(extra: ["--dc-loss-after", "3", "--id", "d-3"])
        let leading = try await eventually(timeout: .seconds(20)) { ok.log().contains("leading with epoch") }
        #expect(leading, "3 s (the least) is accepted: \(ok.log())")
    }

    @Test("a job already queued behind a datacenter's busy slot moves to the other datacenter's idle slot")
    func queuedJobsMoveToIdleSlots() async throws {
        var dispatcher = try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1"])
        try cluster.startWorker(dc: "west", name: "west-1", extra: ["--concurrency", "1"])
        try await Task.sleep(for: .seconds(2))
        let held = try await submit(task: "hold", run: "h")
        #expect(try await eventually(timeout: .seconds(30)) {
            cluster.taskEvents().contains { $0.event == "start" && $0.key == "dag.hold.h" }
        }, "\(cluster.logs())")
        // its start reaches the ledger --start-record-delay after the launch
        #expect(try await eventually(timeout: .seconds(30)) { try await ledger(held) != nil })
        let heldDC = try #require(try await ledger(held)).dc
        let otherDC = heldDC == "east" ? "west" : "east"
        // With the dispatcher stopped, queue a job in the held datacenter's queue, as prefetch does when a
        // datacenter that claimed fast then has all its slots taken by long tasks.
        dispatcher.signal(SIGTERM)
        #expect(await dispatcher.waitForExit(timeout: .seconds(20)) == 0)
        let stuck = try await submit(task: "ok", run: "s")
        let broker = RedisBroker(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        try await broker.connect()
        #expect(try await broker.dispatch(queue: "default", to: heldDC, max: 1, epoch: nil) == 1)
        // the dispatcher comes back: the job must run in the other datacenter while the held task still runs
        dispatcher = try cluster.startDispatcher(name: "dispatcher-2")
        let s = try await waitForFinal([stuck], timeout: .seconds(60))
        #expect(s[stuck] == "SUCCESS", "the queued job waited behind the held task: \(s)\n\(cluster.logs())")
        #expect(try await ledger(stuck)?.dc == otherDC)
        #expect(try await states([held])[held] == "STARTED", "the held task is still running")
        try cluster.release(dag: "dag", run: "h")
        #expect(try await waitForFinal([held])[held] == "SUCCESS")
    }

    @Test("a quick task's start and end are one transaction; a long task shows STARTED while it runs; both keep their history")
    func startRecordedOnceOrTogether() async throws {
        try cluster.startDispatcher()
        // a start delay far above the stand-in airflow's start-up (a Python script) and far below the slow task
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--start-record-delay", "3"])
        try await Task.sleep(for: .seconds(1))
        let quick = try await submit(task: "ok", run: "quick")
        let slow = try await submit(task: "sleep-8", run: "slow")
        // the long task's start is written on its own while it runs, once it has run past the delay
        _ = try await eventually(timeout: .seconds(30)) { try await states([slow])[slow] == "STARTED" }
        let running = try await pg.query("SELECT started_at IS NOT NULL AS s, finished_at IS NULL AS f FROM tandem_tasks WHERE task_id = $1", [.text(slow)])
        #expect(running.rows.first?.string("s") == "t" && running.rows.first?.string("f") == "t")
        let s = try await waitForFinal([quick, slow])
        #expect(s[quick] == "SUCCESS" && s[slow] == "SUCCESS", "\(s)\n\(cluster.logs())")
        func history(_ id: String) async throws -> [(event: String, tx: String)] {
            try await pg.query("SELECT event, xmin::text AS tx FROM tandem_task_events WHERE task_id = $1 ORDER BY id", [.text(id)])
                .rows.map { ($0.string("event") ?? "", $0.string("tx") ?? "") }
        }
        let q = try await history(quick)
        let l = try await history(slow)
        #expect(q.map(\.event) == ["claimed", "started", "success"] && l.map(\.event) == ["claimed", "started", "success"])
        // quick: claim, start, result and end committed together; slow: the start committed before the end
        #expect(Set(q.map(\.tx)).count == 1, "\(q)")
        #expect(l.first?.tx != l.last?.tx, "\(l)")
        let sameTx = try await pg.query(
            "SELECT (m.xmin::text = t.xmin::text) AS same FROM celery_taskmeta m JOIN tandem_tasks t USING (task_id) WHERE task_id = $1",
            [.text(quick)])
        #expect(sameTx.rows.first?.string("same") == "t")
    }

    @Test("a task process inherits none of the worker's sockets (Redis connections, HTTP listener): only stdin, stdout and stderr reach it")
    func noSocketLeaksIntoTasks() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1")
        let id = try await submit(task: "no-sockets", run: "fds")
        let s = try await waitForFinal([id])
        let log = (try? String(contentsOfFile: cluster.fakeLog, encoding: .utf8)) ?? ""
        #expect(s[id] == "SUCCESS", "\(log)")
        #expect(!log.contains("inherited-sockets"), "\(log)")
    }

    @Test("kill -9 of a worker mid-run: its tasks are reclaimed after the lease and complete once, never twice at once")
    func killNineLosesNothing() async throws {
        try cluster.startDispatcher(extra: ["--dc-loss-after", "3"])
        let east = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "6", "--lease-ttl", "3", "--renew-every", "1"])
        try await Task.sleep(for: .seconds(1.5))
        var ids: [String] = []
        // held tasks: none can end in east however slowly the six start on a busy machine
        for i in 0..<6 { ids.append(try await submit(task: "hold", run: "k\(i)")) }
        // wait until east is running all of them, then kill it without warning
        let running = try await eventually(timeout: .seconds(30)) {
            cluster.taskEvents().filter { $0.event == "start" }.count >= 6
        }
        #expect(running, "\(cluster.logs())")
        east.signal(SIGKILL)
        _ = await east.waitForExit(timeout: .seconds(5))
        // east's task processes die with it (parent-death signal); once they are gone the runs may end, in west
        let fakeLog = (try? String(contentsOfFile: cluster.fakeLog, encoding: .utf8)) ?? ""
        let startLines: [[Substring]] = fakeLog.split(separator: "\n").map { $0.split(separator: " ") }
        let eastPIDs: [pid_t] = startLines.filter { $0.first == "start" && $0.count >= 4 }.compactMap { pid_t($0[3]) }
        #expect(eastPIDs.count == 6)
        let orphansGone = try await eventually(timeout: .seconds(20)) { eastPIDs.allSatisfy { kill($0, 0) != 0 } }
        #expect(orphansGone, "east's task processes outlived it: \(eastPIDs)")
        for i in 0..<6 { try cluster.release(dag: "dag", run: "k\(i)") }
        try cluster.startWorker(dc: "west", name: "west-1", extra: ["--concurrency", "6", "--lease-ttl", "3", "--renew-every", "1"])
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        let events = cluster.taskEvents()
        #expect(!events.contains { $0.event == "DUPLICATE" }, "a task ran twice at once:\n\(events)")
        for id in ids {
            let l = try #require(try await ledger(id))
            #expect(l.dc == "west")
            #expect(l.attempts == 2)
        }
        // the killed worker's children died with it (parent-death signal): no east run ever ended
        let ended = Set(events.filter { $0.event == "end" }.map(\.key))
        #expect(ended.count == 6)
        #expect(events.filter { $0.event == "end" }.count == 6, "each task should end exactly once: \(events)")
    }

    @Test("SIGTERM: the worker stops claiming, lets running tasks finish, and exits 0")
    func sigtermIsGraceful() async throws {
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2"])
        try await Task.sleep(for: .seconds(1.5))
        let first = [try await submit(task: "sleep-2", run: "g0"), try await submit(task: "sleep-2", run: "g1")]
        _ = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().filter { $0.event == "start" }.count == 2 }
        w.signal(SIGTERM)
        try await Task.sleep(for: .milliseconds(300))
        let later = try await submit(task: "ok", run: "g2")
        let code = await w.waitForExit(timeout: .seconds(30))
        #expect(code == 0, "\(w.log())")
        let s = try await states(first + [later])
        #expect(first.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(w.log())")
        #expect(s[later] == nil, "a draining worker must not claim new work")
        #expect(!cluster.taskEvents().contains { $0.event == "term" })
        // the work it did not take is done by the next worker
        try cluster.startWorker(dc: "east", name: "east-2")
        let s2 = try await waitForFinal([later])
        #expect(s2[later] == "SUCCESS")
    }

    @Test("a slow Postgres (result table locked): the worker stops claiming at --max-finishing, keeps its leases, and finishes everything once it catches up")
    func slowPostgresStopsClaims() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(
            dc: "east", name: "east-1",
            extra: ["--concurrency", "2", "--max-finishing", "3", "--lease-ttl", "4", "--renew-every", "1"])
        _ = try await eventually(timeout: .seconds(30)) {
            (try? await pg.query("SELECT to_regclass('celery_taskmeta') IS NOT NULL AS ok"))?.rows.first?.string("ok") == "t"
        }
        // Postgres answers nothing that writes a result until this transaction ends (reads still work)
        let locker = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "lock"))
        _ = try await locker.query("BEGIN")
        _ = try await locker.query("LOCK TABLE celery_taskmeta IN EXCLUSIVE MODE")
        var ids: [String] = []
        for i in 0..<20 { ids.append(try await submit(task: "ok", run: "slow\(i)")) }
        let started = { cluster.taskEvents().filter { $0.event == "start" }.count }
        let reached = try await eventually(timeout: .seconds(60)) { started() >= 3 }
        #expect(reached, "\(cluster.logs())")
        // longer than a lease: the jobs it holds stay its own (renewed, not reclaimed and re-run), and it claims no
        // more than the 3 waiting to be written plus the 2 that were running when it stopped
        try await Task.sleep(for: .seconds(6))
        let whileSlow = started()
        #expect(whileSlow >= 3 && whileSlow <= 5, "claimed past --max-finishing while Postgres was slow: \(whileSlow) started\n\(cluster.logs())")
        #expect(try await states(ids).isEmpty)
        _ = try await locker.query("COMMIT")
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        let starts = cluster.taskEvents().filter { $0.event == "start" }
        #expect(starts.count == 20, "each task runs once: \(starts.count) starts")
        #expect(Set(starts.map(\.key)).count == 20)
        #expect(!cluster.taskEvents().contains { $0.event == "DUPLICATE" })
        locker.close()
    }

    @Test("a worker started while Postgres cannot be reached runs its tasks, spools their results and flushes them (schema created first) once Postgres answers; a wrong database name still fails the start")
    func startsWhilePostgresIsUnreachable() async throws {
        let pgURL = try #require(URLComponents(string: cluster.postgresURL))
        let link = try FaultProxy(upstreamPort: try #require(pgURL.port))
        defer { link.stop() }
        link.partition()
        cluster.extraEnvironment["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+postgresql+psycopg2://postgres@127.0.0.1:\(link.port)\(pgURL.path)"
        cluster.extraEnvironment["TANDEM_POSTGRES_REPLY_TIMEOUT"] = "3"
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2"])
        let started = try await eventually(timeout: .seconds(30)) { w.log().contains("cannot reach Postgres at start") }
        #expect(started && w.isRunning, "\(w.log())")
        var ids: [String] = []
        for i in 0..<4 { ids.append(try await submit(task: "ok", run: "nopg\(i)")) }
        // run and acked while Postgres is still cut off; the results wait in the spool
        let acked = try await eventually(timeout: .seconds(60)) {
            let leases = try await redis.send(["ZCARD", Keys.leases]).int
            let queued = try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int
            return cluster.taskEvents().filter { $0.event == "end" }.count == 4 && leases == 0 && queued == 0
        }
        #expect(acked, "\(cluster.logs())")
        // (the heartbeat that reports it comes every few seconds)
        let shown = try await eventually(timeout: .seconds(20)) {
            Int(try await redis.send(["HGET", Keys.worker("east-1"), "spooled"]).string ?? "") ?? 0 >= 4
        }
        #expect(shown, "\(w.log())")
        #expect((try? await states(ids))?.isEmpty ?? true)

        link.heal()
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        #expect(w.log().contains("its schema is ready"), "\(w.log())")
        #expect(cluster.taskEvents().filter { $0.event == "start" }.count == 4)

        // a database that does not exist is a configuration error, not an outage: the start fails, saying so
        cluster.extraEnvironment["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+postgresql+psycopg2://postgres@127.0.0.1:\(pgURL.port!)/no_such_db"
        let wrong = try cluster.startWorker(dc: "east", name: "east-2")
        #expect(await wrong.waitForExit(timeout: .seconds(30)) == 2, "\(wrong.log())")
        #expect(wrong.log().contains("does not exist") && !wrong.log().contains("starting anyway"), "\(wrong.log())")
    }

    @Test("a task's exit wakes no thread of the worker but its loop: its SIGCHLD is discarded as it is sent, not queued for the main thread")
    func taskExitsDoNotWakeTheMainThread() async throws {
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2"])
        // the main thread parks in sigsuspend for the process's lifetime: each wake-up is one signal taken
        func mainThreadWakeUps() -> Int? {
            guard let text = try? String(contentsOfFile: "/proc/\(w.pid)/task/\(w.pid)/status", encoding: .utf8) else { return nil }
            return text.split(separator: "\n").first { $0.hasPrefix("voluntary_ctxt_switches") }
                .flatMap { Int($0.split(separator: "\t").last ?? "") }
        }
        let warm = try await submit(task: "ok", run: "warm")
        _ = try await waitForFinal([warm])
        let before = try #require(mainThreadWakeUps())
        var ids: [String] = []
        for i in 0..<30 { ids.append(try await submit(task: "ok", run: "chld\(i)")) }
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        let after = try #require(mainThreadWakeUps())
        // a queued SIGCHLD woke it once per task (30 here)
        #expect(after - before <= 3, "the main thread woke \(after - before) times for 30 task exits")
    }

    @Test("a task's path (claim reply, fork, exit, next claim) runs on the worker loop: the Swift pool's threads wake less than once per task")
    func taskPathStaysOnTheLoop() async throws {
        try cluster.startDispatcher()
        // tasks that take a millisecond (the fake airflow's Python start takes ~100 ms, long enough for the
        // lease and self-fencing timers, which rightly run on the pool, to blur the count)
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--airflow", "/bin/true"])
        // context switches of the threads named after Dispatch's global (cooperative pool) queue; the loop is
        // "tandem-loop", the Redis/Postgres connections' queues are the ".overcommit" threads
        func poolSwitches() -> Int {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(w.pid)/task")) ?? []
            return tasks.reduce(0) { sum, tid in
                let comm = (try? String(contentsOfFile: "/proc/\(w.pid)/task/\(tid)/comm", encoding: .utf8)) ?? ""
                guard comm.trimmingCharacters(in: .whitespacesAndNewlines).hasSuffix("default-qos"),
                    let status = try? String(contentsOfFile: "/proc/\(w.pid)/task/\(tid)/status", encoding: .utf8)
                else { return sum }
                // voluntary only: being preempted on a busy machine is not waking up
                return sum + status.split(separator: "\n").filter { $0.hasPrefix("voluntary_ctxt_switches") }
                    .compactMap { Int($0.split(separator: "\t").last ?? "") }.reduce(0, +)
            }
        }
        let warm = try await submit(task: "ok", run: "warm")
        _ = try await waitForFinal([warm])
        let before = poolSwitches()
        let started = ContinuousClock.now
        var ids: [String] = []
        for i in 0..<200 { ids.append(try await submit(task: "ok", run: "loop\(i)")) }
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        let woke = poolSwitches() - before
        // the lease, heartbeat and self-fencing timers rightly wake the pool a few times a second: as many
        // wake-ups as an idle spell as long as the run are not the task path's
        let took = ContinuousClock.now - started
        let idleFrom = poolSwitches()
        try await Task.sleep(for: took)
        let idle = poolSwitches() - idleFrom
        print("pool threads' voluntary context switches for 200 tasks: \(woke) in \(took); idle for as long: \(idle)")
        // with each task's path on pool threads it was ~8 per task (1,600 here)
        #expect(woke - idle < 200, "the pool's threads switched \(woke) times for 200 tasks (\(idle) when idle as long)")
    }

    @Test("--claim-ahead 1: with its one slot busy the worker holds one more job, unstarted; at SIGTERM that job goes back to the front of its queue at once (not after its lease); each task runs once")
    func claimAheadGivesBackAtShutdown() async throws {
        // a long hold limit: what gives the job back here must be the SIGTERM, however slow the machine
        let (w, held, next) = try await cluster.holdOneBehindALongTask(redis: redis, run: "ah", extra: ["--claim-ahead-hold", "60"])
        let eastQueue = Keys.queue(datacenter: "east", queue: "default")
        #expect(try await redis.send(["LLEN", eastQueue]).int == 0)
        #expect(cluster.taskEvents().filter { $0.event == "start" && $0.key.hasSuffix(".ah") }.count == 1, "the job claimed ahead must not start while the slot is busy")
        w.signal(SIGTERM)
        // given back while the held task still runs
        let givenBack = try await eventually(timeout: .seconds(30)) { try await redis.send(["LLEN", eastQueue]).int == 1 }
        #expect(givenBack, "\(cluster.logs())")
        // STARTED is a deferred write (the start-record delay, then a group commit): it may still be on its way
        let startedRecorded = try await eventually(timeout: .seconds(20)) { try await states([held])[held] == "STARTED" }
        let heldState = try await states([held])
        #expect(startedRecorded, "\(heldState)")
        try cluster.release(dag: "dag", run: "ah")
        #expect(await w.waitForExit(timeout: .seconds(30)) == 0, "\(w.log())")
        try cluster.startWorker(dc: "east", name: "east-2")
        let s = try await waitForFinal([held, next])
        #expect(s[held] == "SUCCESS" && s[next] == "SUCCESS", "\(s)\n\(cluster.logs())")
        let starts = cluster.taskEvents().filter { $0.event == "start" && $0.key.hasSuffix(".ah") }
        #expect(starts.count == 2, "each task runs once: \(starts.map(\.key))")
        #expect(!cluster.taskEvents().contains { $0.event == "DUPLICATE" })
    }

    @Test("--claim-ahead: the heartbeat lists the job held ahead apart from the running one; --claim-ahead-hold 30 keeps it past the default 2 s")
    func heartbeatListsHeldJobs() async throws {
        let (_, held, next) = try await cluster.holdOneBehindALongTask(redis: redis, run: "hb", extra: ["--claim-ahead-hold", "30"])
        let inspector = BrokerInspector(client: redis)
        let shown = try await eventually(timeout: .seconds(30)) {
            let w = try await inspector.workers().first
            return w?.aheadJobs.count == 1 && w?.runningJobs.count == 1
        }
        let w = try await inspector.workers().first
        #expect(shown, "\(String(describing: w))\n\(cluster.logs())")
        // past the default 2 s it is still held: the flag took effect
        try await Task.sleep(for: .seconds(3))
        #expect(try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 0,
            "given back before --claim-ahead-hold")
        #expect(!cluster.logs().contains("held ahead for"), "\(cluster.logs())")
        try cluster.release(dag: "dag", run: "hb")
        let s = try await waitForFinal([held, next])
        #expect(s[held] == "SUCCESS" && s[next] == "SUCCESS", "\(s)\n\(cluster.logs())")
    }

    @Test("--claim-ahead: a job held behind a task that turned out long goes back to its queue after 2 s, and another worker runs it while that task still runs")
    func claimAheadHoldLimit() async throws {
        let (w, long, next) = try await cluster.holdOneBehindALongTask(redis: redis, run: "hl")
        let eastQueue = Keys.queue(datacenter: "east", queue: "default")
        // the hold limit (2 s) puts it back for any worker …
        let givenBack = try await eventually(timeout: .seconds(30)) { try await redis.send(["LLEN", eastQueue]).int == 1 }
        #expect(givenBack, "\(cluster.logs())")
        #expect(w.log().contains("held ahead for"), "\(w.log())")
        // … and the worker, its tasks now long, does not claim it ahead again
        try await Task.sleep(for: .seconds(1))
        #expect(try await redis.send(["LLEN", eastQueue]).int == 1, "re-claimed ahead behind a long task: \(w.log())")
        try cluster.startWorker(dc: "east", name: "east-2", extra: ["--concurrency", "1"])
        let first = try await waitForFinal([next])
        #expect(first[next] == "SUCCESS", "\(cluster.logs())")
        #expect(try await states([long])[long] == "STARTED", "the long task still runs")
        try cluster.release(dag: "dag", run: "hl")
        let s = try await waitForFinal([long, next])
        #expect(s[long] == "SUCCESS")
        let attempts = try await pg.query("SELECT max(attempts) AS a FROM tandem_tasks")
        #expect(attempts.rows.first?.int("a") == 1, "a held job given back keeps its attempt (refunded)")
        #expect(cluster.taskEvents().filter { $0.event == "start" }.count == 3, "each task runs once")
    }

    @Test("--claim-ahead: a worker whose tasks run longer than --claim-ahead-max-run (default 50 ms) claims only for free slots")
    func claimAheadOnlyWhileTasksAreShort() async throws {
        let broker = RedisBroker(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        defer { broker.close() }
        let warm = try await submit(task: "sleep-0.2", run: "long")
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 1)
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1", "--claim-ahead", "1"])
        #expect(try await waitForFinal([warm])[warm] == "SUCCESS", "\(cluster.logs())")
        _ = try await submit(task: "hold", run: "short")
        _ = try await submit(task: "ok", run: "short")
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 2)
        let started = try await eventually(timeout: .seconds(30)) {
            cluster.taskEvents().contains { $0.event == "start" && $0.key == "dag.hold.short" }
        }
        #expect(started, "\(cluster.logs())")
        try await Task.sleep(for: .seconds(1))
        #expect(try await redis.send(["ZCARD", Keys.leases]).int == 1, "nothing held ahead behind a task after 0.2 s ones")
        #expect(try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 1)
        try cluster.release(dag: "dag", run: "short")
    }

    @Test("--claim-ahead 1 under a backlog: every task runs once and succeeds")
    func claimAheadBacklog() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--claim-ahead", "1", "--airflow", "/bin/true"])
        var ids: [String] = []
        for i in 0..<100 { ids.append(try await submit(task: "ok", run: "b\(i)")) }
        let s = try await waitForFinal(ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        // one attempt each: nothing held ahead was lost or claimed twice
        let attempts = try await pg.query("SELECT max(attempts) AS a, count(*) AS n FROM tandem_tasks")
        #expect(attempts.rows.first?.int("a") == 1 && attempts.rows.first?.int("n") == 100)
    }

    /// A flag value the worker must refuse, and what its message must say.
    struct BadFlag: Sendable, CustomTestStringConvertible {
        var args: [String] = []
        var env: [String: String] = [:]
        var message: String
        var testDescription: String { (env.map { "\($0.key)=\($0.value)" }.sorted() + args).joined(separator: " ") }
    }

    @Test("a bad flag or environment value is refused at start-up (exit 64) with a message naming it and what to pass", arguments: [
        BadFlag(args: ["--claim-ahead=-1"], message: "--claim-ahead must be 0 or more"),
        BadFlag(args: ["--claim-ahead-max-run", "0"], message: "--claim-ahead-max-run must be more than 0 ms"),
        BadFlag(args: ["--claim-ahead-hold", "0"], message: "--claim-ahead-hold must be more than 0 seconds"),
        BadFlag(env: ["TANDEM_CLAIM_AHEAD_HOLD": "2s"], message: "TANDEM_CLAIM_AHEAD_HOLD=2s is not a number"),
        BadFlag(env: ["TANDEM_CLAIM_AHEAD": "one"], message: "TANDEM_CLAIM_AHEAD=one is not a number"),
        BadFlag(args: ["--max-finishing", "0"], message: "--max-finishing must be at least 1"),
        BadFlag(args: ["--runner-pool-idle=-1"], message: "--runner-pool-idle must be 0"),
        BadFlag(env: ["TANDEM_RUNNER_POOL_IDLE": "1m"], message: "TANDEM_RUNNER_POOL_IDLE=1m is not a number"),
    ])
    func badFlagRefused(_ flag: BadFlag) async throws {
        cluster.extraEnvironment.merge(flag.env) { $1 }
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: flag.args)
        let code = await w.waitForExit(timeout: .seconds(30))
        #expect(code == 64, "\(w.log())")
        #expect(w.log().contains(flag.message), "\(w.log())")
    }

    @Test("--shutdown-grace forever waits for a running task past any fixed grace (as Celery's warm shutdown); TANDEM_SHUTDOWN_GRACE sets a fixed one; a bad value is refused")
    func shutdownGraceForeverAndFromTheEnvironment() async throws {
        cluster.extraEnvironment["TANDEM_SHUTDOWN_GRACE"] = "1"
        try cluster.startDispatcher()
        // the flag wins over the environment's 1 s
        let patient = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1", "--shutdown-grace", "forever"])
        let held = try await submit(task: "hold", run: "patient")
        _ = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().contains { $0.event == "start" } }
        patient.signal(SIGTERM)
        let stopping = try await eventually(timeout: .seconds(20)) { patient.log().contains("as long as they take") }
        #expect(stopping, "\(patient.log())")
        // well past the environment's 1 s grace: the worker still waits, and has stopped nothing
        try await Task.sleep(for: .seconds(3))
        #expect(patient.isRunning && !patient.log().contains("passed with"), "\(patient.log())")
        try cluster.release(dag: "dag", run: "patient")
        #expect(await patient.waitForExit(timeout: .seconds(30)) == 0, "\(patient.log())")
        // the task ran to its end (a stopped `hold` records no end)
        #expect(try await states([held])[held] == "SUCCESS")
        #expect(cluster.taskEvents().filter { $0.event == "end" }.count == 1)

        // the environment alone: 1 s, then the task is stopped (and recorded FAILURE)
        let hasty = try cluster.startWorker(dc: "east", name: "east-2", extra: ["--concurrency", "1"])
        let second = try await submit(task: "hold", run: "hasty")
        _ = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().filter { $0.event == "start" }.count == 2 }
        hasty.signal(SIGTERM)
        #expect(await hasty.waitForExit(timeout: .seconds(30)) == 0, "\(hasty.log())")
        #expect(hasty.log().contains("shutdown grace of 1.0 seconds passed with 1 task(s) running"), "\(hasty.log())")
        #expect(try await states([second])[second] == "FAILURE", "stopped after the grace: recorded, not put back")
        #expect(cluster.taskEvents().filter { $0.event == "end" }.count == 1, "the stopped task did not end on its own")
        #expect(try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 0, "not put back")
        try cluster.release(dag: "dag", run: "hasty")

        cluster.extraEnvironment["TANDEM_SHUTDOWN_GRACE"] = "soon"
        let refused = try cluster.startWorker(dc: "east", name: "east-3")
        #expect(await refused.waitForExit(timeout: .seconds(30)) == 64, "\(refused.log())")
        #expect(refused.log().contains("--shutdown-grace takes seconds or 'forever' ('soon' given)"), "\(refused.log())")
    }

    @Test("a second SIGTERM stops running tasks, each recorded FAILURE with why and acked — not put back: Airflow runs a started try once")
    func secondSigtermRecordsStoppedTasks() async throws {
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2"])
        try await Task.sleep(for: .seconds(1.5))
        let ids = [try await submit(task: "sleep-30", run: "s0"), try await submit(task: "sleep-30", run: "s1")]
        _ = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().filter { $0.event == "start" }.count == 2 }
        w.signal(SIGTERM)
        // the second only once the first was handled: two signals pending at once are one to the kernel
        let stopping = try await eventually(timeout: .seconds(20)) { w.log().contains("shutting down: no new claims") }
        #expect(stopping, "\(w.log())")
        w.signal(SIGTERM)
        let code = await w.waitForExit(timeout: .seconds(20))
        #expect(code == 0, "\(w.log())")
        let afterStop = try await states(ids)
        #expect(ids.allSatisfy { afterStop[$0] == "FAILURE" }, "stopped tasks are recorded, as Celery records a lost worker's: \(afterStop)")
        let detail = try await pg.query(
            "SELECT detail FROM tandem_task_events WHERE task_id = $1 AND event = 'failure'", [.text(ids[0])])
        #expect(detail.rows.first?.string("detail")?.contains("stopped by the worker's shutdown before it finished") == true,
            "\(detail.rows)")
        #expect(try await redis.send(["ZCARD", Keys.leases]).int == 0, "acked")
        // another worker: the stopped tasks are not run again (a job claimed but not started does go back:
        // claimAheadGivesBackAtShutdown)
        try cluster.startWorker(dc: "east", name: "east-2")
        let later = try await submit(task: "ok", run: "later")
        let s = try await waitForFinal([later])
        #expect(s[later] == "SUCCESS", "\(cluster.logs())")
        let starts = cluster.taskEvents().filter { $0.event == "start" }.map(\.key)
        #expect(starts.filter { $0.hasSuffix(".s0") || $0.hasSuffix(".s1") }.count == 2, "\(starts)")
        #expect(!cluster.taskEvents().contains { $0.event == "DUPLICATE" })
    }

    @Test("a worker and a dispatcher refuse to start against a key layout a newer Tandem wrote, saying to upgrade (a rolling upgrade's old binaries stop instead of misreading)")
    func newerKeyLayoutIsRefused() async throws {
        _ = try await redis.send(["SET", Keys.layout, "99"])
        let w = try cluster.startWorker(dc: "east", name: "east-old")
        let d = try cluster.startDispatcher(name: "dispatcher-old")
        let wCode = await w.waitForExit(timeout: .seconds(30))
        let dCode = await d.waitForExit(timeout: .seconds(30))
        #expect(wCode != nil && wCode != 0, "\(w.log())")
        #expect(dCode != nil && dCode != 0, "\(d.log())")
        for p in [w, d] {
            #expect(p.log().contains("this Redis holds Tandem key layout 99, written by a newer Tandem") && p.log().contains("upgrade this host's Tandem"), "\(p.log())")
        }
    }

    @Test("--kill-timeout: a stopped task that ignores SIGTERM (as an Airflow 3 task does, running on_kill) gets that long before SIGKILL; 0 kills at once; a bad value is refused")
    func killTimeoutGivesOnKillItsTime() async throws {
        try cluster.startDispatcher()
        let patient = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1", "--kill-timeout", "30"])
        let first = try await submit(task: "ignore-term", run: "k30")
        _ = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().contains { $0.event == "start" } }
        patient.signal(SIGTERM)
        _ = try await eventually(timeout: .seconds(20)) { patient.log().contains("shutting down: no new claims") }
        patient.signal(SIGTERM)
        _ = try await eventually(timeout: .seconds(20)) { patient.log().contains("stopping now") }
        // the task got its SIGTERM (and ignores it); well short of 30 s, it is not killed yet
        try await Task.sleep(for: .seconds(3))
        #expect(patient.isRunning && !cluster.taskEvents().contains { $0.event == "end" }, "\(patient.log())")
        #expect(try await states([first])[first] == "STARTED")
        patient.signal(SIGKILL)  // (its task dies with it: parent-death signal)
        _ = await patient.waitForExit(timeout: .seconds(10))

        let hasty = try cluster.startWorker(dc: "east", name: "east-2", extra: ["--concurrency", "1", "--kill-timeout", "0"])
        let second = try await submit(task: "ignore-term", run: "k0")
        _ = try await eventually(timeout: .seconds(60)) { cluster.taskEvents().contains { $0.event == "start" && $0.key.hasSuffix(".k0") } }
        hasty.signal(SIGTERM)
        _ = try await eventually(timeout: .seconds(20)) { hasty.log().contains("shutting down: no new claims") }
        hasty.signal(SIGTERM)
        #expect(await hasty.waitForExit(timeout: .seconds(30)) == 0, "\(hasty.log())")
        #expect(try await states([second])[second] == "FAILURE", "killed at once, recorded")

        cluster.extraEnvironment["TANDEM_KILL_TIMEOUT"] = "soon"
        let refused = try cluster.startWorker(dc: "east", name: "east-3")
        #expect(await refused.waitForExit(timeout: .seconds(30)) == 64, "\(refused.log())")
        #expect(refused.log().contains("TANDEM_KILL_TIMEOUT=soon is not a number"), "\(refused.log())")
    }

    @Test("malformed and foreign messages are dead-lettered with a reason, never executed; the worker keeps serving")
    func malformedCorpus() async throws {
        let marker = cluster.dir + "/pwned"
        func envelope(body: String, headers: String = "{}", encoding: String = "base64") -> String {
            """
            {"body": "\(body)", "content-encoding": "utf-8", "content-type": "application/json", "headers": \(headers), \
            "properties": {"correlation_id": "x", "delivery_tag": "\(UUID().uuidString)", "body_encoding": "\(encoding)", \
            "delivery_info": {"exchange": "", "routing_key": "default"}, "priority": 0, "delivery_mode": 2}}
            """
        }
        func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }
        func proto2(_ name: String, _ id: String, args: String) -> String {
            envelope(body: b64("[\(args), {}, {\"callbacks\": null, \"errbacks\": null, \"chain\": null, \"chord\": null}]"),
                headers: "{\"lang\": \"py\", \"task\": \"\(name)\", \"id\": \"\(id)\", \"retries\": 0, \"timelimit\": [null, null], \"root_id\": \"\(id)\", \"parent_id\": null, \"argsrepr\": \"\", \"kwargsrepr\": \"{}\", \"origin\": \"t\"}")
        }
        let corpus: [(String, String)] = [
            ("not json", "this is not json"),
            ("json, not an envelope", "[1, 2, 3]"),
            ("bad base64", envelope(body: "%%%not-base64%%%", headers: "{\"task\": \"execute_command\", \"id\": \"b1\"}")),
            ("unknown compression", envelope(body: b64("[]"), headers: "{\"task\": \"execute_command\", \"id\": \"c1\", \"compression\": \"application/x-brotli\"}")),
            ("foreign task", proto2("myapp.tasks.send_email", "foreign-1", args: "[\"a@b.c\"]")),
            ("shell argv", proto2("execute_command", "shell-1", args: "[[\"bash\", \"-c\", \"touch \(marker)\"]]")),
            ("airflow but not tasks run", proto2("execute_command", "notrun-1", args: "[[\"airflow\", \"db\", \"reset\", \"-y\"]]")),
            ("argv with a number", proto2("execute_command", "num-1", args: "[[\"airflow\", \"tasks\", \"run\", 5]]")),
            ("workload without token", proto2("execute_workload", "wl-1", args: "[\"{\\\"type\\\": \\\"ExecuteTask\\\", \\\"ti\\\": {}}\"]")),
            ("workload not json", proto2("execute_workload", "wl-2", args: "[\"{not json\"]")),
            ("protocol 1 foreign", envelope(body: b64("{\"task\": \"other.task\", \"id\": \"p1-1\", \"args\": [], \"kwargs\": {}}"))),
        ]
        for (_, raw) in corpus { _ = try await redis.send(["LPUSH", "default", raw]) }
        let good = try await submit(task: "ok", run: "after-junk")
        try cluster.startDispatcher()
        let w = try cluster.startWorker(dc: "east", name: "east-1")
        let s = try await waitForFinal([good], timeout: .seconds(60))
        #expect(s[good] == "SUCCESS", "\(cluster.logs())")
        let inspector = BrokerInspector(client: redis)
        let ok = try await eventually(timeout: .seconds(20)) { try await inspector.deadLetters().count == corpus.count }
        let deadCount = try await inspector.deadLetters().count
        #expect(ok, "dead letters: \(deadCount) of \(corpus.count)\n\(cluster.logs())")
        for id in try await inspector.deadLetters() {
            let job = try await inspector.job(id)
            #expect(job["state"] == "dead")
            #expect((job["reason"] ?? "").count > 10, "a reason a person can act on: \(job)")
            #expect(job["raw"] != nil, "the message is kept verbatim")
        }
        #expect(!FileManager.default.fileExists(atPath: marker), "a non-Airflow argv was executed")
        // messages with a task id got a FAILURE the scheduler can read
        let f = try await states(["foreign-1", "shell-1", "notrun-1", "num-1", "wl-1", "wl-2"])
        #expect(f.values.allSatisfy { $0 == "FAILURE" } && f.count == 6, "\(f)")
        #expect(cluster.taskEvents().count == 2)  // start + end of the one good task
        #expect(w.isRunning)
    }

    @Test("time limits from the message: soft sends SIGTERM, hard sends SIGKILL; both end in FAILURE")
    func timeLimits() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1")
        try await Task.sleep(for: .seconds(1.5))
        // limits count from the launch, so they leave Python time to start and install its SIGTERM handler on a
        // busy machine (at 1 s it sometimes had not, and died of the default action)
        let soft = try await submit(task: "term-exit", run: "soft", soft: 4)
        let hard = try await submit(task: "ignore-term", run: "hard", soft: 4, hard: 6)
        let s = try await waitForFinal([soft, hard], timeout: .seconds(60))
        // term-exit exits 0 on SIGTERM: the task handled its soft limit and succeeded, as in Celery
        #expect(s[soft] == "SUCCESS", "\(cluster.logs())")
        #expect(s[hard] == "FAILURE")
        #expect(cluster.taskEvents().contains { $0.event == "term" && $0.key.hasSuffix(".soft") })
        let tb = try await pg.query("SELECT traceback FROM celery_taskmeta WHERE task_id = $1", [.text(hard)])
        #expect(tb.rows.first?.string("traceback")?.contains("signal 9") == true)
    }

    @Test("routing: pin waits while its datacenter is lost, pin+fallback moves and hands back, dc drain sends new work elsewhere")
    func routingPolicySemantics() async throws {
        let policy = cluster.dir + "/policy.yaml"
        try "queues: {reports: {pin: east, fallback: west}, audit: {pin: east}, default: {spread: [east, west]}}\n"
            .write(toFile: policy, atomically: true, encoding: .utf8)
        try cluster.startDispatcher(extra: ["--policy", policy, "--dc-loss-after", "3", "--leader-lease", "2"])
        let flags = ["--queues", "default,reports,audit", "--lease-ttl", "4", "--renew-every", "1"]
        let east = try cluster.startWorker(dc: "east", name: "east-1", extra: flags)
        try cluster.startWorker(dc: "west", name: "west-1", extra: flags)
        try await Task.sleep(for: .seconds(2))
        func dcs(_ ids: [String]) async throws -> Set<String> {
            var out = Set<String>()
            for id in ids { if let l = try await ledger(id) { out.insert(l.dc) } }
            return out
        }
        // both alive: pinned queues run in east only
        var r1: [String] = [], a1: [String] = []
        for i in 0..<3 { r1.append(try await submit(task: "ok", run: "r1-\(i)", queue: "reports")) }
        for i in 0..<2 { a1.append(try await submit(task: "ok", run: "a1-\(i)", queue: "audit")) }
        _ = try await waitForFinal(r1 + a1)
        #expect(try await dcs(r1 + a1) == ["east"], "\(cluster.logs())")

        // east lost: reports falls back to west; audit (no fallback) waits in its ingress list
        east.signal(SIGKILL)
        let inspector = BrokerInspector(client: redis)
        let eastLost = try await eventually(timeout: .seconds(30)) {
            try await inspector.datacenters(lossAfterMs: 3000).first { $0.name == "east" }?.status == .lost
        }
        #expect(eastLost, "\(cluster.logs())")
        try await Task.sleep(for: .seconds(1))  // the dispatcher's own look at the heartbeats comes within a second
        var r2: [String] = [], a2: [String] = []
        for i in 0..<3 { r2.append(try await submit(task: "ok", run: "r2-\(i)", queue: "reports")) }
        for i in 0..<2 { a2.append(try await submit(task: "ok", run: "a2-\(i)", queue: "audit")) }
        _ = try await waitForFinal(r2)
        #expect(try await dcs(r2) == ["west"])
        try await Task.sleep(for: .seconds(2))
        #expect(try await states(a2).isEmpty, "a pinned queue without fallback must wait for its datacenter")
        let waitingAudit = try await BrokerInspector(client: redis).ingressWaiting(queues: ["audit"])["audit"] ?? -1
        #expect(waitingAudit == 2, "both audit messages wait (kombu's list or the dispatcher's staging list)")

        // east back: the waiting audit work runs there, and reports returns to east
        try cluster.startWorker(dc: "east", name: "east-2", extra: flags)
        _ = try await waitForFinal(a2)
        #expect(try await dcs(a2) == ["east"])
        var r3: [String] = []
        for i in 0..<2 { r3.append(try await submit(task: "ok", run: "r3-\(i)", queue: "reports")) }
        _ = try await waitForFinal(r3)
        #expect(try await dcs(r3) == ["east"], "pin with fallback hands back once its datacenter is alive")

        // maintenance: dc drain east — new default work goes to west only; restore brings east back
        try await inspector.setOverride("east", .drain)
        try await Task.sleep(for: .seconds(1))
        var d: [String] = []
        for i in 0..<6 { d.append(try await submit(task: "ok", run: "d-\(i)")) }
        _ = try await waitForFinal(d)
        #expect(try await dcs(d) == ["west"])
        try await inspector.setOverride("east", nil)
        let back = try await inspector.datacenters(lossAfterMs: 15000)
        #expect(back.first { $0.name == "east" }?.status == .alive)
    }

    @Test("Airflow 3 duplicate delivery (runner exit 75, API 409): acked with no result, so the healthy run is not failed")
    func duplicateWorkloadIsAckedWithoutResult() async throws {
        cluster.extraEnvironment = ["TANDEM_PYTHON": Repo.root + "/Tests/Fixtures/bin/python-workload-check",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:9/execution/"]
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--runner", "spawn"])
        var ids: [String] = []
        for task in ["already-running", "ok"] {
            let id = UUID().uuidString.lowercased()
            let workload = """
                {"type": "ExecuteTask", "token": "header.payload.sig", "dag_rel_path": "d.py", "bundle_info": {"name": "dags-folder"}, \
                "log_path": "d/t.log", "ti": {"id": "\(UUID().uuidString.lowercased())", "dag_id": "d", "task_id": "\(task)", \
                "run_id": "r", "try_number": 1, "map_index": -1, "queue": "default", "pool_slots": 1, "priority_weight": 1}}
                """
            let m = CeleryPublisher.message(taskName: "execute_workload", id: id, args: [.string(workload)])
            _ = try await redis.send(["LPUSH", m.list, m.element])
            ids.append(id)
        }
        let done = try await eventually(timeout: .seconds(60)) {
            let dup = (try? await ledger(ids[0]))??.outcome == "DUPLICATE"  // tables appear once the worker starts
            let other = try await states([ids[1]])[ids[1]]
            return dup && other == "SUCCESS"
        }
        #expect(done, "\(cluster.logs())")
        let s = try await states(ids)
        #expect(s[ids[0]] != "FAILURE" && s[ids[0]] != "SUCCESS", "no final result for the duplicate: \(s)")
        // the ack follows the ledger's DUPLICATE, so it may land a moment after that is seen
        let acked = try await eventually(timeout: .seconds(20)) { try await redis.send(["ZCARD", Keys.leases]).int == 0 }
        #expect(acked, "the duplicate was never acked: \(cluster.logs())")
        #expect(try await BrokerInspector(client: redis).deadLetters().isEmpty)
    }
}
