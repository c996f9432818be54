import ArgumentParser
import CeleryWire
import Foundation
import Logging
import Postgres
import Redis
import Setup
import TandemCore
import TandemPostgres
import TandemRedis

@main
struct Executorctl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "executorctl",
        abstract: "Shows and steers Tandem: queues, workers, tasks, datacenters, dead letters.",
        discussion: """
            Tables are coloured on a terminal (NO_COLOR turns that off); every command takes --json for scripts.
            Destructive commands (dc fail, dlq replay, dlq purge, adopt, handback) ask first unless --yes; without a terminal to ask
            on they refuse.
            Exit codes: 0 ok, 1 not found / refused / declined, 2 cannot reach Redis or Postgres, 64 bad usage.
            """,
        version: TandemVersion.current,
        subcommands: [
            Queues.self, Workers.self, WorkerCmd.self, TaskCmd.self, Submit.self, DC.self, DispatcherCmd.self, DLQ.self,
            Leases.self, Ingress.self, Watch.self, AdoptCmd.self, HandBackCmd.self,
        ])
}

/// Flags every subcommand shares.
struct Common: ParsableArguments {
    @Option(help: "Celery broker URL (env AIRFLOW__CELERY__BROKER_URL; default \(Defaults.broker)).")
    var broker: String?
    @Option(name: .customLong("master-name"), help: "Sentinel master name.")
    var masterName: String?
    @Flag(help: "Print JSON instead of a table.")
    var json = false

    var brokerURL: String { setting(broker, env: "AIRFLOW__CELERY__BROKER_URL", default: Defaults.broker)! }

    /// Connects to the broker or exits 2 with one line saying what failed.
    func inspector() async throws -> BrokerInspector {
        quietLogging()
        do {
            let b = try await openBroker(url: brokerURL, masterName: masterName, logger: Logger(label: "executorctl"))
            return BrokerInspector(client: b.client)
        } catch {
            failForStore(error, server: "Redis at \(brokerURL.redactingPassword)")
        }
    }

    /// Runs `body` against Redis; a failure part-way (Redis went away) exits 2 with one line, not a stack of errors.
    func withInspector(_ body: (BrokerInspector) async throws -> Void) async throws {
        let i = try await inspector()
        do {
            try await body(i)
        } catch let e as ExitCode {
            throw e
        } catch {
            failForStore(error, server: "Redis at \(brokerURL.redactingPassword)")
        }
    }
}

/// executorctl prints its own one-line errors; library logging would only repeat them.
func quietLogging() {
    struct Once { nonisolated(unsafe) static var done = false }
    if Once.done { return }
    Once.done = true
    LoggingSystem.bootstrap { _ in SwiftLogNoOpLogHandler() }
}

struct Queues: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per datacenter and queue: depth, in flight, oldest age; then what waits in Airflow's lists, and why if nothing can take it.")
    @OptionGroup var common: Common
    @Option(name: .customLong("dc-loss-after"), help: "Loss threshold in seconds, for which workers count as live (default 15).")
    var lossAfter: Double = 15
    func validate() throws {
        if let problem = DatacenterHealth.lossAfterProblem(lossAfter) { throw ValidationError(problem) }
    }
    func run() async throws {
        try await common.withInspector { i in
        let stats = try await i.queueStats()
        if common.json {
            printJSON(stats.map { ["datacenter": $0.datacenter, "queue": $0.queue, "depth": $0.depth, "in_flight": $0.inFlight, "oldest_age_ms": $0.oldestAgeMs] })
            return
        }
        printTable(
            ["DATACENTER", "QUEUE", "DEPTH", "IN FLIGHT", "OLDEST"],
            stats.map { [$0.datacenter, $0.queue, String($0.depth), String($0.inFlight), seconds($0.oldestAgeMs)] })
        let airflow = try await AirflowLists.read(i, lossAfterMs: Int64(lossAfter * 1000))
        let reserved = try await i.celeryReservedCount()
        if let line = celeryReservedLine(reserved) { print(""); print(Style.paint(line, Style.yellow)) }
        let waiting = airflow.waiting.filter { $0.value > 0 }.sorted { $0.key < $1.key }
        if waiting.isEmpty { return }
        print("")
        print("waiting in Airflow's lists (not dispatched yet):")
        printTable(["QUEUE", "WAITING", "SERVED IN", "STRANDED"], waiting.map { q, n in
            let served = airflow.servedIn[q] ?? []
            return [q, String(n), served.isEmpty ? "-" : served.joined(separator: ","), airflow.stranded[q] ?? ""]
        }) { row, col, _ in col == 3 && airflow.stranded[waiting[row].key] != nil ? Style.red : nil }
        }
    }
}

/// One line on what stock Celery workers reserved and never acked (nil: nothing).
func celeryReservedLine(_ r: (count: Int, oldestAgeMs: Int64?)) -> String? {
    guard r.count > 0 else { return nil }
    let age = r.oldestAgeMs.map { ", the oldest \(seconds($0)) ago" } ?? ""
    return "\(r.count) message(s) reserved by stock Celery workers and never acked (kombu's unacked hash\(age)): Tandem does not run them — once no Celery worker runs, executorctl adopt --all"
}

/// What waits in Airflow's lists, per queue, as `executorctl` can judge it (the routing policy lives with the
/// dispatchers: its log and `tandem_ingress_stranded` also name work the policy sends where nothing serves it).
struct AirflowLists {
    /// Each list's length (staging, plain and priority siblings of every queue looked at).
    var lists: [(queue: String, list: String, depth: Int)] = []
    var waiting: [String: Int] = [:]
    /// Datacenters whose live, running workers serve the queue.
    var servedIn: [String: [String]] = [:]
    /// Queue -> why nothing can take its waiting messages.
    var stranded: [String: String] = [:]

    static func read(_ i: BrokerInspector, lossAfterMs: Int64) async throws -> AirflowLists {
        let workers = try await i.workers(withinMs: lossAfterMs)
        let live = Set(try await i.datacenters(lossAfterMs: lossAfterMs).filter(\.acceptsWork).map(\.name))
        return try await read(i, workers: workers, live: live, declared: try await i.declaredQueues())
    }

    /// Looks at 'default', the `declared` queues (every queue a publisher declared: `watch` finds them a few
    /// SCAN pages per frame), the ones `named` and those `workers` (heard from within the loss window) serve;
    /// `live`: the datacenters that accept work.
    static func read(
        _ i: BrokerInspector, workers: [WorkerStatus], live: Set<String>, declared: [String], named: [String] = []
    ) async throws -> AirflowLists {
        var queues = Set(declared).union(named).union(["default"])
        for w in workers { queues.formUnion(w.queues) }
        var out = AirflowLists()
        out.lists = try await i.ingressLists(queues: queues.sorted())
        for l in out.lists { out.waiting[l.queue, default: 0] += l.depth }
        for q in queues { out.servedIn[q] = StrandedQueue.takers(of: q, workers: workers, live: live).sorted() }
        for s in StrandedQueue.find(waiting: out.waiting, workers: workers, live: live, policy: nil) { out.stranded[s.queue] = s.reason }
        return out
    }
}

struct DispatcherCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dispatcher",
        abstract: "Which dispatcher leads, for how long, and the time left on its lease; exits 1 when none leads.")
    @OptionGroup var common: Common
    func run() async throws {
        var read: LeaderLease?
        try await common.withInspector { i in read = try await i.leaderLease() }
        let lease = read
        if common.json {
            printJSON(leaderJSON(lease))
        } else if let lease, lease.isLive {
            printTable(["LEADER", "EPOCH", "LEADING FOR", "LEASE LEFT"], [[
                lease.owner, String(lease.epoch), seconds(lease.nowMs - lease.sinceMs), seconds(lease.deadlineMs - lease.nowMs),
            ]])
        }
        if lease?.isLive != true {
            fail(noLeaderProblem(lease), code: Exit.notFound)
        }
    }
}

/// The leader lease for --json (`dispatcher`, and each `watch` frame).
func leaderJSON(_ lease: LeaderLease?) -> [String: Any] {
    let live = lease?.isLive ?? false
    var out: [String: Any] = ["leader": NSNull(), "last_owner": NSNull(), "epoch": 0, "live": live]
    var leadingFor: Int64 = 0
    var left: Int64 = 0
    if let lease {
        out["last_owner"] = lease.owner
        out["epoch"] = lease.epoch
        if live {
            out["leader"] = lease.owner
            leadingFor = lease.nowMs - lease.sinceMs
            left = lease.deadlineMs - lease.nowMs
        }
    }
    out["leading_for_ms"] = leadingFor
    out["lease_left_ms"] = left
    return out
}

/// "dispatcher: OWNER leads (epoch N)" while someone holds the lease (`dc status`, `watch`); nil when none does.
func leaderLine(_ lease: LeaderLease?) -> String? {
    guard let lease, lease.isLive else { return nil }
    return "dispatcher: \(lease.owner) leads (epoch \(lease.epoch))"
}

/// "redis: … of … maxmemory (…)", yellow from 80%, red from 95% with what it means (`dc status`, `watch`).
func memoryLine(_ m: RedisMemory) -> String {
    let f = m.fraction ?? 0
    let line = "redis: " + m.summary
    if f >= 0.95 {
        return Style.paint(line + " — at maxmemory Redis refuses Airflow's publishes (new tasks cannot be queued): raise maxmemory or find what fills it", Style.red)
    }
    return f >= 0.8 ? Style.paint(line, Style.yellow) : line
}

/// Why nothing is being dispatched when no dispatcher holds the lease, and what to do.
func noLeaderProblem(_ lease: LeaderLease?) -> String {
    let last = lease.map { "; the last leader was \($0.owner) (epoch \($0.epoch)), which stepped down or stopped renewing its lease" } ?? ""
    return "no dispatcher leads\(last): nothing moves from Airflow's lists into datacenter queues, no lease is reclaimed and no lost datacenter is drained — start swift-dispatcher (a standby in any datacenter takes the lead by itself within its lease) or check the running one's log"
}

struct Workers: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Workers: datacenter, slots busy/total, jobs claimed ahead (leased, not started), result writes waiting in the local spool, last heartbeat, version; 'gone?' once silent past the loss threshold.")
    @OptionGroup var common: Common
    @Option(name: .customLong("dc-loss-after"), help: "Seconds of silence after which a worker shows as gone? (default 15, as the dispatcher's).")
    var lossAfter: Double = 15
    func validate() throws {
        if let problem = DatacenterHealth.lossAfterProblem(lossAfter) { throw ValidationError(problem) }
    }
    func run() async throws {
        let lossMs = Int64(lossAfter * 1000)
        try await common.withInspector { i in
        let now = try await i.client.time().milliseconds
        let ws = try await i.workers().sorted { ($0.datacenter, $0.workerID) < ($1.datacenter, $1.workerID) }
        if common.json {
            printJSON(ws.map {
                ["worker": $0.workerID, "datacenter": $0.datacenter, "slots": $0.slots, "busy": $0.busy,
                 "queues": $0.queues, "hostname": $0.hostname, "pid": Int($0.pid), "state": $0.state.rawValue,
                 "last_heartbeat_ms_ago": now - $0.lastSeenMs, "running_jobs": $0.runningJobs,
                 "claimed_ahead_jobs": $0.aheadJobs, "spooled_writes": $0.spooledWrites, "version": $0.version,
                 "silent": now - $0.lastSeenMs > lossMs] as [String: Any]
            })
        } else {
            printTable(
                ["WORKER", "DATACENTER", "BUSY/SLOTS", "AHEAD", "SPOOLED", "QUEUES", "STATE", "LAST HEARTBEAT", "VERSION"],
                ws.map {
                    // silent past the loss threshold: what it said last no longer holds; probably dead
                    [$0.workerID, $0.datacenter, "\($0.busy)/\($0.slots)", String($0.aheadJobs.count), String($0.spooledWrites),
                     $0.queues.joined(separator: ","), now - $0.lastSeenMs > lossMs ? "gone?" : $0.state.rawValue,
                     seconds(now - $0.lastSeenMs) + " ago", $0.version.isEmpty ? "-" : $0.version]
                }
            ) { row, col, text in
                // results waiting on the worker's disk: Postgres is unreachable from it, Airflow cannot see them yet
                if col == 4 && ws[row].spooledWrites > 0 { return Style.red }
                if col == 6 { return text == "gone?" ? Style.red : Style.state(text) }
                if col == 7 && now - ws[row].lastSeenMs > lossMs { return Style.red }
                return nil
            }
            for w in ws where w.spooledWrites > 0 {
                print("\(w.workerID) has \(w.spooledWrites) write(s) in its local spool: it cannot reach Postgres (check its log and the result backend); Airflow sees those tasks' results once they are flushed")
            }
        }
        }
    }
}

struct WorkerCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker", abstract: "Drain one worker for maintenance (it stays up, claims nothing new), or restore it.",
        subcommands: [Drain.self, Restore.self])

    struct Drain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "WORKER claims nothing new from its next heartbeat (within 2 s); its running tasks finish; jobs it claimed ahead go back at once. It stays up.")
        @OptionGroup var common: Common
        @Flag(help: "Set it even for a worker id no heartbeat has named (one about to start).") var force = false
        @Argument var worker: String
        func run() async throws {
            try await common.withInspector { i in
                let known = Set(try await i.workers().map(\.workerID))
                if !known.contains(worker) && !force {
                    fail("no worker '\(worker)' has heartbeated here (known: \(known.sorted().joined(separator: ", "))); check the id (executorctl workers), or add --force to drain it before it starts", code: Exit.notFound)
                }
                try await i.setWorkerDrain(worker, true)
            }
            if common.json { printJSON(["worker": worker, "drain": true] as [String: Any]) } else {
                print("worker \(worker) draining: it claims nothing new from its next heartbeat and its running tasks finish; STATE shows draining and BUSY falls to 0 in `executorctl workers`; `executorctl worker restore \(worker)` undoes it")
            }
        }
    }

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Undo a worker drain: it claims work again from its next heartbeat.")
        @OptionGroup var common: Common
        @Argument var worker: String
        func run() async throws {
            var had = false
            try await common.withInspector { i in
                had = try await i.drainedWorkers().contains(worker)
                if had { try await i.setWorkerDrain(worker, false) }
            }
            if common.json { printJSON(["worker": worker, "drain": false, "was_drained": had] as [String: Any]) } else {
                print(had ? "worker \(worker) restored: it claims work again from its next heartbeat" : "worker \(worker) was not drained; nothing changed")
            }
        }
    }
}

struct TaskCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task", abstract: "A task's state and history from the ledger.")
    @OptionGroup var common: Common
    @Option(name: .customLong("result-backend"), help: "Postgres URL of the ledger (env TANDEM_LEDGER_URL, else AIRFLOW__CELERY__RESULT_BACKEND).")
    var resultBackend: String?
    @Argument(help: "Celery task id.") var taskID: String

    func run() async throws {
        quietLogging()
        guard let url = setting(resultBackend, env: "TANDEM_LEDGER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"), isPostgresURL(url) else {
            fail("the ledger is in Postgres: pass --result-backend db+postgresql://… or set TANDEM_LEDGER_URL", code: Exit.usage)
        }
        var found: LedgerEntry?
        var state = CeleryState.pending
        do {
            let store = PostgresStore(configuration: try PostgresConfiguration(url: url), logger: Logger(label: "executorctl"))
            // read-only: no schema migration (a read-only database user can look), so a database no worker has
            // written to has no ledger yet
            let hasLedger = try await store.client.query("SELECT to_regclass('tandem_tasks') IS NOT NULL AS ok").rows.first?.string("ok") == "t"
            if hasLedger {
                found = try await store.entry(taskID: taskID)
                state = try await store.state(taskID: taskID)
            }
        } catch { failForStore(error, server: "Postgres at \(url.redactingPassword)") }
        guard let e = found else {
            // not recorded by any worker: look for its message in Redis, so "stuck in queued" says where it waits
            var places: [TaskLocation] = []
            var served: AirflowLists?
            try await common.withInspector { i in
                served = try await AirflowLists.read(i, lossAfterMs: 15_000)
                places = try await i.locate(taskID: taskID, queues: (served?.waiting.keys).map { Array($0).sorted() } ?? ["default"])
            }
            if places.isEmpty {
                fail("no task \(taskID) in the ledger or in Redis (Airflow's lists, datacenter queues, leases, dead letters): not published to this broker, or finished and acked before a ledger existed? Check the id and --broker / --result-backend", code: Exit.notFound)
            }
            let lines = places.map { place -> String in
                switch place {
                case .waitingInAirflowList(let q, let list, let position):
                    let why = served?.stranded[q].map { " — stranded: \($0)" } ?? " — waiting for the dispatcher to move it (executorctl dispatcher, queues)"
                    return "waiting in Airflow's list \(printableList(list)) (position \(position) of what comes next), not dispatched yet\(why)"
                case .queuedInDatacenter(let dc, let q, let job, let position):
                    return "queued in \(dc)/\(q) as job \(job) (position \(position)), not claimed yet — see executorctl queues / workers for \(dc)'s slots"
                case .leased(let job, let owner, let dc, let remaining):
                    return "job \(job) is leased to \(owner) in \(dc) (\(remaining < 0 ? "expired, awaiting reclaim" : "lease left \(seconds(remaining))")) but not yet recorded as started"
                case .deadLettered(let job, let reason):
                    return "dead-lettered as job \(job): \(reason) — executorctl dlq show \(job)"
                case .reservedByCelery(let ageMs):
                    return "reserved by a stock Celery worker \(ageMs.map { seconds($0) + " ago" } ?? "") and never acked (kombu's unacked hash): Tandem does not run it — if no Celery worker runs any more, executorctl adopt --all"
                }
            }
            if common.json {
                printJSON(["task_id": taskID, "in_ledger": false, "celery_state": "PENDING", "where": lines] as [String: Any])
            } else {
                print("task \(taskID)  \(Style.paint("PENDING", Style.yellow))  (no worker has recorded it)")
                for l in lines { print("  " + l) }
            }
            return
        }
        if common.json {
            printJSON([
                "task_id": e.taskID, "job_id": e.jobID, "name": e.taskName, "ingress_queue": e.ingressQueue,
                "datacenter": e.datacenter, "dispatched_at": e.dispatchedAt ?? NSNull(), "claimed_by": e.claimedBy ?? NSNull(),
                "token": e.token, "attempts": e.attempts, "started_at": e.startedAt ?? NSNull(),
                "finished_at": e.finishedAt ?? NSNull(), "outcome": e.outcome ?? NSNull(),
                "exit_status": e.exitStatus ?? NSNull(), "celery_state": state.rawValue,
                "events": e.events.map { ["at": $0.at, "event": $0.event, "worker": $0.worker ?? NSNull(), "datacenter": $0.datacenter ?? NSNull(), "token": $0.token ?? NSNull(), "detail": $0.detail ?? NSNull()] as [String: Any] },
            ] as [String: Any])
        } else {
            let c: String? = state.rawValue == "SUCCESS" ? Style.green : state.rawValue == "FAILURE" ? Style.red : Style.yellow
            print("task \(e.taskID)  \(Style.paint(state.rawValue, c))")
            print("  name \(e.taskName)  queue \(printableList(e.ingressQueue))  datacenter \(e.datacenter)  job \(e.jobID)")
            print("  attempts \(e.attempts)  claimed by \(e.claimedBy ?? "-")  token \(e.token)  exit \(e.exitStatus.map(String.init) ?? "-")")
            print("  dispatched \(e.dispatchedAt ?? "-")  started \(e.startedAt ?? "-")  finished \(e.finishedAt ?? "-")")
            printTable(["AT", "EVENT", "WORKER", "DC", "TOKEN", "DETAIL"], e.events.map {
                [$0.at, $0.event, $0.worker ?? "", $0.datacenter ?? "", $0.token.map(String.init) ?? "", $0.detail ?? ""]
            })
        }
    }
}

struct Submit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Publish a Celery message exactly as the stock Celery client does (for demos and tests).",
        discussion: "Example: executorctl submit -- airflow tasks run my_dag my_task run_1 --local")
    @OptionGroup var common: Common
    @Option(help: "Airflow queue (default 'default').") var queue = "default"
    @Option(help: "Task name (default execute_command; execute_workload takes --workload-file).") var name = "execute_command"
    @Option(name: .customLong("workload-file"), help: "Airflow 3 workload JSON to send as execute_workload.") var workloadFile: String?
    @Option(help: "Celery task id (default: a new uuid).") var id: String?
    @Option(help: "Message priority 0-9 (kombu priority lists).") var priority: Int?
    @Option(name: .customLong("time-limit"), help: "Hard time limit in seconds.") var timeLimit: Double?
    @Option(name: .customLong("soft-time-limit"), help: "Soft time limit in seconds.") var softTimeLimit: Double?
    @Option(help: "How many copies (each with its own id).") var count = 1
    @Argument(parsing: .captureForPassthrough, help: "The argv for execute_command.") var argv: [String] = []

    func run() async throws {
        guard count >= 1 else { throw ValidationError("--count must be at least 1") }
        if let p = priority, !(0...9).contains(p) { throw ValidationError("--priority must be 0-9") }
        try await common.withInspector { i in
        var ids: [String] = []
        var name = self.name
        var args: [JSONValue]
        if let workloadFile {
            guard let text = try? String(contentsOfFile: workloadFile, encoding: .utf8) else {
                fail("cannot read workload file \(workloadFile)", code: Exit.usage)
            }
            name = "execute_workload"
            args = [.string(text)]
        } else {
            let a = argv.first == "--" ? Array(argv.dropFirst()) : argv
            args = [.array(a.map { .string($0) })]
        }
        for _ in 0..<count {
            let tid = count == 1 ? (id ?? UUID().uuidString.lowercased()) : UUID().uuidString.lowercased()
            let m = CeleryPublisher.message(
                taskName: name, id: tid, args: args, queue: queue, priority: priority,
                timeLimit: (hard: timeLimit, soft: softTimeLimit))
            // exactly what kombu does on publish: declare the binding, then LPUSH
            let replies = try await i.client.pipeline([
                ["SADD", CeleryPublisher.bindingKey(queue: queue), CeleryPublisher.bindingMember(queue: queue)],
                ["LPUSH", m.list, m.element],
            ])
            // a pipeline answers a refused command (a full Redis: OOM) with an error reply, not a throw
            if case .error(let message)? = replies.last {
                let done = ids.isEmpty ? "nothing was published" : "\(ids.count) published before it: \(ids.joined(separator: ", "))"
                fail("Redis refused the publish of \(tid): \(message) (\(done))"
                    + (message.hasPrefix("OOM") ? " — Redis is at its maxmemory: let the workers drain it, or raise maxmemory" : ""),
                    code: Exit.notFound)
            }
            ids.append(tid)
        }
        if common.json { printJSON(["queue": queue, "task_ids": ids]) } else { ids.forEach { print($0) } }
        }
    }
}

struct DC: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dc", abstract: "Datacenter health and operator overrides.",
        subcommands: [Status.self, Drain.self, Fail.self, Restore.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Each datacenter: alive, draining or lost, and why.")
        @OptionGroup var common: Common
        @Option(name: .customLong("dc-loss-after"), help: "Loss threshold in seconds (default 15).") var lossAfter: Double = 15
        func validate() throws {
            if let problem = DatacenterHealth.lossAfterProblem(lossAfter) { throw ValidationError(problem) }
        }
        func run() async throws {
            try await common.withInspector { i in
            let s = try await i.datacenters(lossAfterMs: Int64(lossAfter * 1000))
            if common.json {
                printJSON(s.map { ["datacenter": $0.name, "status": $0.status.rawValue, "reason": $0.reason, "live_workers": $0.liveWorkers, "slots": $0.slots, "busy": $0.busy] as [String: Any] })
            } else {
                printTable(["DATACENTER", "STATUS", "WORKERS", "BUSY/SLOTS", "WHY"], s.map {
                    [$0.name, $0.status.rawValue, String($0.liveWorkers), "\($0.busy)/\($0.slots)", $0.reason]
                }) { _, col, text in col == 1 ? Style.state(text) : nil }
                // the dispatcher is what moves a lost datacenter's work: say whether one is there to do it
                let lease = try await i.leaderLease()
                print(leaderLine(lease) ?? "dispatcher: " + noLeaderProblem(lease))
                print(memoryLine(try await i.memory()))
            }
            }
        }
    }

    struct Drain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Maintenance: no new work to DC; running work finishes.")
        @OptionGroup var common: Common
        @Flag(help: "Set it even for a datacenter no worker, queue or override has named yet.") var force = false
        @Argument var dc: String
        func run() async throws {
            try await setOverride(common, dc, .drain, force: force,
                "draining: no new work goes there and its running tasks finish; its workers' BUSY falls to 0 in `executorctl dc status`; `executorctl dc restore \(dc)` undoes it")
        }
    }

    struct Fail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Declare DC lost now: its queued work moves to survivors.")
        @OptionGroup var common: Common
        @Flag(help: "Do not ask for confirmation.") var yes = false
        @Flag(help: "Set it even for a datacenter no worker, queue or override has named yet.") var force = false
        @Argument var dc: String
        func run() async throws {
            if let p = Names.problem(datacenter: dc) { fail(p, code: Exit.usage) }
            if !yes && !confirm("declare datacenter \(dc) lost? its queued work moves to the other datacenters") {
                fail("not confirmed; nothing changed", code: Exit.notFound)
            }
            try await setOverride(common, dc, .fail, force: force, "declared lost")
        }
    }

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Undo drain/fail: DC takes work again once its workers heartbeat.")
        @OptionGroup var common: Common
        @Argument var dc: String
        func run() async throws { try await setOverride(common, dc, nil, force: false, "restored") }
    }
}

/// Sets or (nil) clears an operator override. A name nothing has used (no worker heartbeat, queue or override) is
/// refused unless `force`: `dc drain esat` must not report success while east keeps taking work.
func setOverride(_ common: Common, _ dc: String, _ o: DatacenterOverride?, force: Bool, _ word: String) async throws {
    if let p = Names.problem(datacenter: dc) { fail(p, code: Exit.usage) }
    var had: DatacenterOverride?
    try await common.withInspector { i in
        let overrides = try await i.overrides()
        had = overrides[dc]
        let known = Set(try await i.datacenters(lossAfterMs: 3_600_000).map(\.name)).union(overrides.keys)
        if !known.contains(dc) && !force {
            let names = known.sorted().joined(separator: ", ")
            fail("no datacenter named '\(dc)' is known here (\(names.isEmpty ? "none is: no worker has heartbeated" : "known: " + names)); check the spelling"
                + (o == nil ? "" : ", or add --force to set it before its first worker starts"), code: Exit.notFound)
        }
        if o != nil || had != nil { try await i.setOverride(dc, o) }
    }
    if common.json {
        printJSON(["datacenter": dc, "override": o?.rawValue ?? NSNull(), "previous": had?.rawValue ?? NSNull()] as [String: Any])
    } else if o == nil && had == nil {
        print("datacenter \(dc) had no override; nothing changed")
    } else {
        print("datacenter \(dc) \(word)")
    }
}

struct DLQ: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dlq", abstract: "Dead letters: messages that were not run, with the reason.",
        subcommands: [List.self, Show.self, Replay.self, Purge.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Dead letters, newest first.")
        @OptionGroup var common: Common
        @Option(help: "At most this many (default 100).") var limit = 100
        func validate() throws { guard limit >= 1 else { throw ValidationError("--limit must be at least 1") } }
        func run() async throws {
            try await common.withInspector { i in
                var rows: [[String: String]] = []
                for id in try await i.deadLetters(limit: limit) {
                    var j = try await i.job(id)
                    let task = (try? CeleryTask.decode(raw: Array((j["raw"] ?? "").utf8)))
                    j["task_id"] = task?.id ?? ""
                    j["task_name"] = task?.name ?? ""
                    j["job"] = id
                    rows.append(j)
                }
                if common.json {
                    printJSON(rows.map { $0.filter { $0.key != "raw" } })
                } else {
                    printTable(["JOB", "TASK ID", "NAME", "QUEUE", "DC", "ATTEMPTS", "REASON"], rows.map {
                        [$0["job"]!, $0["task_id"]!, $0["task_name"]!, $0["queue"] ?? "", $0["dc"] ?? "", $0["attempts"] ?? "", $0["reason"] ?? ""]
                    })
                }
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One dead letter: every field, the raw message included.")
        @OptionGroup var common: Common
        @Argument(help: "Job id (executorctl dlq list).") var job: String
        func run() async throws {
            try await common.withInspector { i in
                let j = try await i.job(job)
                guard j["state"] == "dead" else {
                    fail("job \(job) is not in the dead-letter queue (executorctl dlq list)", code: Exit.notFound)
                }
                if common.json { printJSON(j) } else { for k in j.keys.sorted() { print("\(k): \(j[k]!)") } }
            }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Send a dead letter back to its Airflow queue, to be routed again.")
        @OptionGroup var common: Common
        @Flag(help: "Do not ask for confirmation.") var yes = false
        @Argument(help: "Job id (executorctl dlq list).") var job: String
        func run() async throws {
            try await common.withInspector { i in
                guard try await i.job(job)["state"] == "dead" else {
                    fail("job \(job) is not in the dead-letter queue (executorctl dlq list)", code: Exit.notFound)
                }
                if !yes && !confirm("replay job \(job)? it will run again") { fail("not confirmed; nothing changed", code: Exit.notFound) }
                guard try await i.replay(jobID: job) else {
                    fail("job \(job) is not in the dead-letter queue", code: Exit.notFound)
                }
                if common.json { printJSON(["job": job, "replayed": true]) } else { print("job \(job) replayed") }
            }
        }
    }

    struct Purge: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete dead letters for good: one job, or --all.")
        @OptionGroup var common: Common
        @Flag(help: "Do not ask for confirmation.") var yes = false
        @Flag(help: "Every dead letter.") var all = false
        @Argument(help: "Job id (executorctl dlq list).") var job: String?

        func validate() throws {
            if all == (job != nil) { throw ValidationError("name one job to purge, or pass --all (not both)") }
        }

        func run() async throws {
            try await common.withInspector { i in
                if let job {
                    guard try await i.job(job)["state"] == "dead" else {
                        fail("job \(job) is not in the dead-letter queue (executorctl dlq list)", code: Exit.notFound)
                    }
                    if !yes && !confirm("delete job \(job) for good?") { fail("not confirmed; nothing changed", code: Exit.notFound) }
                    guard try await i.purge(jobID: job) else {
                        fail("job \(job) is not in the dead-letter queue", code: Exit.notFound)
                    }
                    if common.json { printJSON(["purged": [job]]) } else { print("job \(job) purged") }
                    return
                }
                let ids = try await i.deadLetters(limit: 1_000_000)
                if ids.isEmpty {
                    if common.json { printJSON(["purged": [String]()]) } else { print("the dead-letter queue is empty") }
                    return
                }
                if !yes && !confirm("delete all \(ids.count) dead letter(s) for good?") {
                    fail("not confirmed; nothing changed", code: Exit.notFound)
                }
                var purged: [String] = []
                for id in ids where try await i.purge(jobID: id) { purged.append(id) }
                if common.json { printJSON(["purged": purged]) } else { print("\(purged.count) dead letter(s) purged") }
            }
        }
    }
}

struct Leases: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Who holds which job, expiring when (negative: expired, awaiting reclaim).")
    @OptionGroup var common: Common
    func run() async throws {
        try await common.withInspector { i in
            let l = try await i.leases()
            // which task each job is: the Celery id and the Airflow dag.task run, from the message itself
            let raws = l.isEmpty ? [] : try await i.client.pipeline(l.map { ["HGET", Keys.job($0.jobID), "raw"] })
            let tasks = raws.map { r in r.bytes.flatMap { try? CeleryTask.decode(raw: $0) } }
            if common.json {
                printJSON(zip(l, tasks).map { l, t in
                    ["job": l.jobID, "owner": l.owner, "token": l.token, "datacenter": l.datacenter, "queue": l.queue,
                     "expires_in_ms": l.remainingMs, "expired": l.remainingMs < 0, "task_id": t?.id ?? "",
                     "airflow": t?.airflowTarget ?? ""] as [String: Any]
                })
            } else {
                printTable(["JOB", "TASK ID", "AIRFLOW TASK", "OWNER", "TOKEN", "DC", "QUEUE", "EXPIRES IN"], zip(l, tasks).map { l, t in
                    [l.jobID, t?.id ?? "-", t?.airflowTarget ?? "-", l.owner, String(l.token), l.datacenter, l.queue,
                     l.remainingMs < 0 ? "expired \(seconds(-l.remainingMs)) ago" : seconds(l.remainingMs)]
                }) { row, _, _ in l[row].remainingMs < 0 ? Style.red : nil }
            }
        }
    }
}

struct Ingress: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The Celery lists as Airflow wrote them (queue and priority siblings).")
    @OptionGroup var common: Common
    @Option(help: "Comma-separated queues (default: 'default' and every queue a publisher declared).") var queues: String?
    func run() async throws {
        try await common.withInspector { i in
            var names = queues.map { $0.split(separator: ",").map(String.init) } ?? []
            if queues == nil { names = try await i.publishedQueues() }
            let rows = try await i.ingressLists(queues: names)
            let printable = rows.map { ($0.list.replacingOccurrences(of: "\u{06}\u{16}", with: "\\x06\\x16"), $0.depth) }
            if common.json { printJSON(printable.map { ["list": $0.0, "depth": $0.1] as [String: Any] }) } else {
                printTable(["LIST", "DEPTH"], printable.map { [$0.0, String($0.1)] })
            }
        }
    }
}
