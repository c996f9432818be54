import Foundation
import Logging
import Redis
import TandemCore
import TandemRedis
import Testing
import TestSupport

@Suite("executorctl against real servers", .serialized)
struct ExecutorctlTests {
    let cluster: Cluster
    let redis: RedisClient

    init() async throws {
        cluster = try Cluster()
        redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
    }

    var env: [String: String] {
        ["AIRFLOW__CELERY__BROKER_URL": cluster.brokerURL, "AIRFLOW__CELERY__RESULT_BACKEND": cluster.resultBackend]
    }

    func ctl(_ args: String...) async throws -> Run { try await executorctl(args, env: env) }

    /// Writes a worker's heartbeat exactly as a running worker does (heartbeat.lua), for views that only read it.
    func heartbeat(_ id: String, dc: String, queues: [String] = ["default"], slots: Int = 2, busy: Int = 0,
                   running: [String] = [], ahead: [String] = [], ttlSeconds: Int = 60) async throws {
        let broker = RedisBroker(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        defer { broker.close() }
        _ = try await broker.heartbeat(
            WorkerStatus(workerID: id, datacenter: dc, slots: slots, busy: busy, queues: queues, hostname: "h", pid: 1,
                runningJobs: running, aheadJobs: ahead, state: .running),
            ttlSeconds: ttlSeconds)
    }

    @discardableResult
    func submit(task: String, run: String) async throws -> String {
        try await publishAirflowCommand(redis, task: task, run: run)
    }

    @Test("every command against a running two-datacenter cluster: tables, --json, confirmations, dc and dlq changes, watch")
    func everyCommand() async throws {
        try cluster.startDispatcher(extra: ["--metrics-port", "0"])
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--metrics-port", "0"])
        try cluster.startWorker(dc: "west", name: "west-1", extra: ["--concurrency", "2", "--metrics-port", "0"])
        let both = try await eventually(timeout: .seconds(20)) {
            let r = try await ctl("dc", "status", "--json")
            let a = (try? r.json() as? [[String: Any]]) ?? []
            return a.filter { $0["status"] as? String == "alive" }.count == 2
        }
        #expect(both, "\(cluster.logs())")

        let ok = try await submit(task: "ok", run: "r1")
        // runs until released at the end: a sleep ran out before `watch` in a loaded full-suite run
        let held = try await submit(task: "hold", run: "long")
        _ = try await redis.send(["LPUSH", "default", "not a kombu envelope"])

        // task: the ledger's view, plain and JSON; unknown → 1
        let finished = try await eventually(timeout: .seconds(30)) { try await ctl("task", ok).out.contains("SUCCESS") }
        #expect(finished, "\(cluster.logs())")
        let task = try await ctl("task", ok)
        #expect(task.code == 0, "\(task)")
        #expect(task.out.hasPrefix("task \(ok)  SUCCESS"), "\(task)")
        #expect(task.out.contains("EVENT") && task.out.contains("claimed"), "\(task)")
        #expect(!task.out.contains("\u{1B}["), "no colour without a terminal")
        let tj = try #require(try await ctl("task", ok, "--json").json() as? [String: Any])
        #expect(tj["celery_state"] as? String == "SUCCESS")
        #expect(tj["attempts"] as? Int == 1)
        let unknown = try await ctl("task", "no-such-task")
        #expect(unknown.code == 1, "\(unknown)")
        #expect(unknown.errLines.count == 1 && unknown.err.contains("no task no-such-task"), "\(unknown)")

        // leases: the long task holds one, not expired
        let leased = try await eventually(timeout: .seconds(20)) {
            ((try? await ctl("leases", "--json").json() as? [[String: Any]]) ?? []).count == 1
        }
        #expect(leased)
        let leases = try #require(try await ctl("leases", "--json").json() as? [[String: Any]])
        #expect(["east-1", "west-1"].contains(leases.first?["owner"] as? String ?? ""), "\(leases)")
        #expect(leases.first?["expired"] as? Bool == false)
        // which task holds it: the Celery id and the Airflow task, read from the message
        #expect(leases.first?["task_id"] as? String == held && leases.first?["airflow"] as? String == "dag.hold long", "\(leases)")
        let lp = try await ctl("leases")
        #expect(lp.code == 0 && lp.out.hasPrefix("JOB  ") && lp.out.contains("EXPIRES IN"), "\(lp)")

        // workers, queues, ingress
        let workers = try #require(try await ctl("workers", "--json").json() as? [[String: Any]])
        #expect(Set(workers.compactMap { $0["worker"] as? String }) == ["east-1", "west-1"])
        #expect(workers.allSatisfy { $0["state"] as? String == "running" && $0["slots"] as? Int == 2 })
        // Postgres answers: nothing waits in a worker's spool (the chaos suite cuts Postgres off and sees it count)
        #expect(workers.allSatisfy { $0["spooled_writes"] as? Int == 0 }, "\(workers)")
        let wp = try await ctl("workers")
        #expect(wp.out.contains("east-1") && wp.out.contains("west-1") && wp.out.contains("BUSY/SLOTS") && wp.out.contains("SPOOLED"), "\(wp)")
        #expect(!wp.out.contains("local spool"), "no worker is said to be cut off from Postgres: \(wp)")
        let queues = try #require(try await ctl("queues", "--json").json() as? [[String: Any]])
        #expect(queues.allSatisfy { $0["queue"] as? String == "default" && $0["depth"] != nil && $0["oldest_age_ms"] != nil })
        #expect(queues.map { $0["in_flight"] as? Int ?? 0 }.reduce(0, +) == 1, "\(queues)")
        #expect(try await ctl("queues").out.hasPrefix("DATACENTER  QUEUE"))
        let ingress = try #require(try await ctl("ingress", "--json").json() as? [[String: Any]])
        #expect(ingress.map { $0["list"] as? String ?? "" } == ["{tandem}:staging:default", "default", "default\\x06\\x163", "default\\x06\\x166", "default\\x06\\x169"])
        #expect(ingress.allSatisfy { $0["depth"] as? Int == 0 }, "\(ingress)")

        // dlq: the malformed message, with its reason
        let dead = try await eventually(timeout: .seconds(20)) {
            ((try? await ctl("dlq", "list", "--json").json() as? [[String: Any]]) ?? []).count == 1
        }
        #expect(dead, "\(cluster.logs())")
        let dlq = try #require(try await ctl("dlq", "list", "--json").json() as? [[String: Any]])
        let job = try #require(dlq.first?["job"] as? String)
        #expect((dlq.first?["reason"] as? String ?? "").isEmpty == false)
        #expect(dlq.first?["raw"] == nil, "list leaves out the raw message")
        let show = try await ctl("dlq", "show", job)
        #expect(show.code == 0 && show.out.contains("reason: ") && show.out.contains("raw: not a kombu envelope"), "\(show)")
        #expect(try await ctl("dlq", "show", "999999").code == 1)

        // replay asks first; without a terminal it refuses and changes nothing
        let refused = try await ctl("dlq", "replay", job)
        #expect(refused.code == 1 && refused.err.contains("pass --yes"), "\(refused)")
        #expect(try await ctl("dlq", "show", job).code == 0)
        let replay = try await ctl("dlq", "replay", job, "--yes", "--json")
        #expect(replay.code == 0, "\(replay)")
        #expect((try replay.json() as? [String: Any])?["replayed"] as? Bool == true)
        #expect(try await ctl("dlq", "replay", job, "--yes").code == 1, "replaying it twice: not in the dlq any more")
        // routed again, dead-lettered again under a new job id
        let deadAgain = try await eventually(timeout: .seconds(20)) {
            let a = (try? await ctl("dlq", "list", "--json").json() as? [[String: Any]]) ?? []
            return a.count == 1 && a.first?["job"] as? String != job
        }
        #expect(deadAgain, "\(cluster.logs())")
        let purgeRefused = try await ctl("dlq", "purge", "--all")
        #expect(purgeRefused.code == 1 && purgeRefused.err.contains("pass --yes"), "\(purgeRefused)")
        #expect(try await ctl("dlq", "purge", "424242", "--yes").code == 1)
        let purged = try await ctl("dlq", "purge", "--all", "--yes")
        #expect(purged.code == 0 && purged.out.contains("1 dead letter(s) purged"), "\(purged)")
        #expect(((try await ctl("dlq", "list", "--json").json() as? [[String: Any]]) ?? [["x": 1]]).isEmpty)

        // dc: drain / restore / fail (asks) / restore
        let drained = try await ctl("dc", "drain", "west")
        #expect(drained.code == 0 && drained.out.hasPrefix("datacenter west draining: no new work goes there"), "\(drained)")
        // a name nothing has used: refused with the known names, changes nothing; --force sets it
        let typo = try await ctl("dc", "drain", "wset")
        #expect(typo.code == 1 && typo.err.contains("no datacenter named 'wset' is known here (known: east, west)"), "\(typo)")
        #expect(typo.err.contains("--force"), "\(typo)")
        #expect(try await ctl("dc", "fail", "wset", "--yes").code == 1)
        #expect(try await ctl("dc", "status", "--json").out.contains("wset") == false)
        #expect(try await ctl("dc", "drain", "north", "--force").code == 0)
        #expect(try await ctl("dc", "restore", "north").out == "datacenter north restored\n")
        #expect(try await ctl("dc", "restore", "north").code == 1, "forgotten once its override is gone")
        #expect(try await ctl("dc", "restore", "east").out == "datacenter east had no override; nothing changed\n")
        func status(_ dc: String) async throws -> String? {
            let a = try await ctl("dc", "status", "--json").json() as? [[String: Any]] ?? []
            return a.first { $0["datacenter"] as? String == dc }?["status"] as? String
        }
        #expect(try await status("west") == "draining")
        #expect(try await ctl("dc", "restore", "west").code == 0)
        #expect(try await status("west") == "alive")
        let failRefused = try await ctl("dc", "fail", "west")
        #expect(failRefused.code == 1 && failRefused.errLines.count == 1 && failRefused.err.contains("pass --yes"), "\(failRefused)")
        #expect(try await status("west") == "alive", "a refused fail changes nothing")
        #expect(try await ctl("dc", "fail", "west", "--yes").code == 0)
        #expect(try await status("west") == "lost")
        let dcPlain = try await ctl("dc", "status")
        #expect(dcPlain.out.contains("declared lost by an operator"), "\(dcPlain)")
        #expect(try await ctl("dc", "restore", "west", "--json").code == 0)

        // submit into a Redis at its maxmemory: refused, said so, exit 1 (a pipeline answers OOM as a reply)
        let memory = try await redis.send(["INFO", "memory"]).string ?? ""
        let used = memory.split(separator: "\r\n").first { $0.hasPrefix("used_memory:") }.map { String($0.dropFirst("used_memory:".count)) } ?? "1"
        _ = try await redis.send(["CONFIG", "SET", "maxmemory", used])
        let full = try await ctl("submit", "--", "airflow", "tasks", "run", "dag", "ok", "oom", "--local")
        let fullStatus = try await ctl("dc", "status")
        _ = try await redis.send(["CONFIG", "SET", "maxmemory", "0"])
        #expect(fullStatus.out.contains("maxmemory (") && fullStatus.out.contains("refuses Airflow's publishes"), "\(fullStatus)")
        #expect(try await ctl("dc", "status").out.contains("(no maxmemory)"))
        #expect(full.code == 1 && full.err.contains("Redis refused the publish") && full.err.contains("maxmemory") && full.out.isEmpty, "\(full)")

        // submit: the stock Celery message; it runs
        let sub = try await ctl("submit", "--json", "--", "airflow", "tasks", "run", "dag", "ok", "r2", "--local")
        let sid = try #require((try sub.json() as? [String: Any])?["task_ids"] as? [String])
        #expect(sid.count == 1)
        let ran = try await eventually(timeout: .seconds(30)) { try await ctl("task", sid[0]).out.contains("SUCCESS") }
        #expect(ran, "\(cluster.logs())")

        // watch: frames one after another without a terminal; --json one object per frame (first, r2's ack —
        // which follows its SUCCESS — has landed, leaving the held task's lease alone)
        let oneLease = try await eventually(timeout: .seconds(20)) {
            (try await ctl("watch", "--json", "--count", "1").json() as? [String: Any])?["leases"] as? Int == 1
        }
        #expect(oneLease, "\(cluster.logs())")
        let watch = try await ctl("watch", "--count", "2", "--interval", "0.2")
        #expect(watch.code == 0, "\(watch)")
        #expect(watch.out.components(separatedBy: "tandem watch").count == 3, "two frames:\n\(watch)")
        #expect(watch.out.contains("east-1") && watch.out.contains("leases 1") && watch.out.contains("dead letters 0"), "\(watch)")
        #expect(watch.out.contains("SPOOLED"), "\(watch)")
        #expect(watch.out.contains("dispatcher: ") && watch.out.contains(" leads (epoch "), "the leader shows: \(watch)")
        #expect(!watch.out.contains("\u{1B}["), "no escapes without a terminal")
        let wj = try #require(try await ctl("watch", "--json", "--count", "1").json() as? [String: Any])
        #expect((wj["datacenters"] as? [[String: Any]])?.count == 2)
        #expect(wj["leases"] as? Int == 1)
        #expect((wj["dispatcher"] as? [String: Any])?["live"] as? Bool == true, "\(wj)")
        try cluster.release(dag: "dag", run: "long")
    }

    @Test("dispatcher: shows the leader and its lease; once none leads, exit 1 with what to do, and dc status says so too")
    func dispatcherLeader() async throws {
        let none = try await ctl("dispatcher")
        #expect(none.code == 1 && none.err.contains("no dispatcher leads") && !none.err.contains("the last leader"), "\(none)")
        let d = try cluster.startDispatcher(extra: ["--metrics-port", "0", "--id", "d-east"])
        let leads = try await eventually(timeout: .seconds(20)) { try await ctl("dispatcher").code == 0 }
        #expect(leads, "\(cluster.logs())")
        let table = try await ctl("dispatcher")
        #expect(table.out.contains("LEADER") && table.out.contains("d-east"), "\(table)")
        let j = try #require(try await ctl("dispatcher", "--json").json() as? [String: Any])
        #expect(j["leader"] as? String == "d-east" && j["live"] as? Bool == true && (j["epoch"] as? Int ?? 0) >= 1, "\(j)")
        #expect((j["lease_left_ms"] as? Int ?? 0) > 0, "\(j)")
        #expect(try await ctl("dc", "status").out.contains("dispatcher: d-east leads"))
        // a clean stop hands the lease back at once: nobody leads now
        d.signal(SIGTERM)
        #expect(await d.waitForExit(timeout: .seconds(30)) == 0, "\(d.log())")
        let gone = try await ctl("dispatcher")
        #expect(gone.code == 1 && gone.err.contains("no dispatcher leads; the last leader was d-east"), "\(gone)")
        #expect(gone.err.contains("start swift-dispatcher"), "says what to do: \(gone)")
        let jg = try #require(try await ctl("dispatcher", "--json").json() as? [String: Any])
        #expect(jg["leader"] is NSNull && jg["last_owner"] as? String == "d-east" && jg["live"] as? Bool == false, "\(jg)")
        #expect(try await ctl("dc", "status").out.contains("dispatcher: no dispatcher leads"))
    }

    @Test("worker drain: the drained worker claims nothing new, finishes what it runs and stays up; restore takes it back; an unknown id is refused")
    func drainOneWorker() async throws {
        try cluster.startDispatcher(extra: ["--metrics-port", "0"])
        let first = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--metrics-port", "0"])
        let held = try await submit(task: "hold", run: "drain")
        let holding = try await eventually(timeout: .seconds(30)) { cluster.taskEvents().contains { $0.event == "start" } }
        #expect(holding, "\(cluster.logs())")
        try cluster.startWorker(dc: "east", name: "east-2", extra: ["--concurrency", "2", "--metrics-port", "0"])
        func state(_ id: String) async throws -> String? {
            let ws = try await ctl("workers", "--json").json() as? [[String: Any]] ?? []
            return ws.first { $0["worker"] as? String == id }?["state"] as? String
        }
        let both = try await eventually(timeout: .seconds(20)) { try await state("east-2") == "running" }
        #expect(both, "\(cluster.logs())")

        let typo = try await ctl("worker", "drain", "east-9")
        #expect(typo.code == 1 && typo.err.contains("no worker 'east-9' has heartbeated here (known: east-1, east-2)"), "\(typo)")
        let drained = try await ctl("worker", "drain", "east-1")
        #expect(drained.code == 0 && drained.out.hasPrefix("worker east-1 draining"), "\(drained)")
        let shown = try await eventually(timeout: .seconds(20)) { try await state("east-1") == "draining" }
        #expect(shown && first.log().contains("drained by an operator"), "\(first.log())")
        // new work goes to east-2 only; east-1 keeps its running task and stays up
        var ids: [String] = []
        for i in 0..<4 { ids.append(try await submit(task: "ok", run: "after-drain-\(i)")) }
        for id in ids {
            let done = try await eventually(timeout: .seconds(30)) { try await ctl("task", id).out.contains("SUCCESS") }
            #expect(done, "\(cluster.logs())")
            let j = try await ctl("task", id, "--json").json() as? [String: Any]
            #expect(j?["claimed_by"] as? String == "east-2", "\(String(describing: j))")
        }
        try cluster.release(dag: "dag", run: "drain")
        let finished = try await eventually(timeout: .seconds(30)) { try await ctl("task", held).out.contains("SUCCESS") }
        #expect(finished && first.isRunning, "\(cluster.logs())")
        #expect((try await ctl("task", held, "--json").json() as? [String: Any])?["claimed_by"] as? String == "east-1")

        #expect(try await ctl("worker", "restore", "east-1").out.hasPrefix("worker east-1 restored"))
        let back = try await eventually(timeout: .seconds(20)) { try await state("east-1") == "running" }
        #expect(back && first.log().contains("drain lifted"), "\(first.log())")
        #expect(try await ctl("worker", "restore", "east-1").out.contains("was not drained; nothing changed"))
    }

    @Test("workers: jobs claimed ahead show apart from running ones (AHEAD column, claimed_ahead_jobs in --json)")
    func claimedAheadPerWorker() async throws {
        // a heartbeat as a worker holding one job ahead sends it (WorkerProcessTests.heartbeatListsHeldJobs: a real
        // worker's heartbeat says so)
        try await heartbeat("east-1", dc: "east", slots: 1, busy: 1, running: ["7"], ahead: ["8"])
        let w = (try await ctl("workers", "--json").json() as? [[String: Any]])?.first
        #expect(w?["claimed_ahead_jobs"] as? [String] == ["8"] && w?["running_jobs"] as? [String] == ["7"], "\(String(describing: w))")
        let table = try await ctl("workers")
        let header = table.out.split(separator: "\n").first.map(String.init) ?? ""
        let row = table.out.split(separator: "\n").first { $0.hasPrefix("east-1") }.map(String.init) ?? ""
        #expect(header.contains("BUSY/SLOTS  AHEAD"), "\(table)")
        #expect(row.contains("1/1") && row.split(separator: " ", omittingEmptySubsequences: true)[3] == "1", "\(table)")
    }

    @Test("queues, watch and ingress show work waiting in Airflow's lists, and name a queue no live worker serves")
    func strandedWork() async throws {
        let broker = RedisBroker(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        defer { broker.close() }
        try await heartbeat("east-1", dc: "east", busy: 2)
        // published as the stock client does (binding, then LPUSH); no dispatcher runs, so both wait
        var ids: [String] = []
        for q in ["default", "gpu", "gpu"] {
            let r = try await ctl("submit", "--queue", q, "--", "airflow", "tasks", "run", "d", "t", "r")
            #expect(r.code == 0, "\(r)")
            ids.append(r.out.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let table = try await ctl("queues")
        #expect(table.code == 0, "\(table)")
        let lines = table.out.split(separator: "\n").map(String.init)
        let gpu = lines.first { $0.hasPrefix("gpu ") } ?? ""
        let dflt = lines.first { $0.hasPrefix("default ") } ?? ""
        #expect(table.out.contains("waiting in Airflow's lists"), "\(table)")
        #expect(gpu.contains(" 2 ") && gpu.contains("no live worker serves queue 'gpu': start one with --queues gpu"), "\(table)")
        #expect(dflt.contains(" 1 ") && dflt.contains("east") && !dflt.contains("no live worker"), "\(table)")

        let frame = try #require(try await ctl("watch", "--json", "--count", "1").json() as? [String: Any])
        let stranded = frame["stranded"] as? [[String: Any]] ?? []
        #expect(stranded.map { $0["queue"] as? String } == ["gpu"] && stranded.first?["waiting"] as? Int == 2, "\(frame)")
        let ingress = try #require(try await ctl("ingress", "--json").json() as? [[String: Any]])
        #expect(ingress.first { $0["list"] as? String == "gpu" }?["depth"] as? Int == 2, "\(ingress)")

        // task: not in the ledger (no worker recorded it), so where it waits in Redis, and why
        let stuck = try await ctl("task", ids[2])
        #expect(stuck.code == 0 && stuck.out.contains("PENDING"), "\(stuck)")
        #expect(stuck.out.contains("waiting in Airflow's list gpu (position 2 of what comes next)")
            && stuck.out.contains("stranded: no live worker serves queue 'gpu'"), "\(stuck)")
        let moved = try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil)
        #expect(moved == 1)
        let queued = try await ctl("task", ids[0], "--json")
        let where_ = (try queued.json() as? [String: Any])?["where"] as? [String] ?? []
        #expect(where_.count == 1 && where_[0].hasPrefix("queued in east/default as job "), "\(queued)")

        // a worker in west that serves gpu: nothing is stranded any more
        try await heartbeat("west-1", dc: "west", queues: ["gpu"])
        let served = try await ctl("queues")
        #expect(!served.out.contains("no live worker"), "\(served)")
        #expect(served.out.split(separator: "\n").first { $0.hasPrefix("gpu ") }?.contains("west") == true, "\(served)")
    }

    @Test("handback: asks first (refuses without a terminal), gives back only the queues named, prints what moved and what to start; a second run has nothing to do")
    func handBackTable() async throws {
        let broker = RedisBroker(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        defer { broker.close() }
        for q in ["default", "default", "gpu"] {
            #expect(try await ctl("submit", "--queue", q, "--", "airflow", "tasks", "run", "d", "t", "r").code == 0)
        }
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 2)
        #expect(try await broker.dispatch(queue: "gpu", to: "west", max: 10, epoch: nil) == 1)
        let asked = try await ctl("handback")
        #expect(asked.code == 1 && asked.err.contains("pass --yes"), "\(asked)")
        #expect(try await redis.send(["LLEN", "default"]).int == 0, "declined: nothing moved")
        let one = try await ctl("handback", "--yes", "--queues", "default")
        #expect(one.code == 0, "\(one)")
        let row = one.out.split(separator: "\n").first { $0.hasPrefix("default ") }.map(String.init) ?? ""
        #expect(row.split(separator: " ") == ["default", "2", "0", "0", "2"], "\(one)")
        #expect(one.out.contains("2 message(s) are back in Airflow's lists, unchanged: start stock workers (airflow celery worker --queues default)"), "\(one)")
        #expect(try await redis.send(["LLEN", "default"]).int == 2)
        #expect(try await redis.send(["LLEN", "gpu"]).int == 0)
        #expect(try await redis.send(["LLEN", Keys.queue(datacenter: "west", queue: "gpu")]).int == 1, "gpu was not named: it stays")
        let again = try await ctl("handback", "--yes", "--queues", "default")
        #expect(again.code == 0 && again.out.contains("nothing to hand back"), "\(again)")
        // a job leased to a worker that no longer heartbeats (killed with -9): nothing runs it; it is named as such
        #expect(try await ctl("submit", "--", "airflow", "tasks", "run", "d", "t", "ghost").code == 0)
        _ = try await redis.send(["RPOP", "default"])  // (the job handed back above, out of the way)
        _ = try await redis.send(["RPOP", "default"])
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 1)
        #expect(try await broker.claim(workerID: "ghost-1", datacenter: "east", queues: ["default"], max: 1, leaseMs: 60_000).count == 1)
        let ghost = try await ctl("handback", "--yes", "--queues", "default")
        #expect(ghost.code == 0 && ghost.out.contains("1 job(s) are leased to ghost-1, which no longer heartbeat(s): nothing runs them now"), "\(ghost)")
        #expect(!ghost.out.contains("finish under Tandem"), "\(ghost)")
    }

    @Test("workers: each one's version, and 'gone?' once silent past the loss threshold (not the state it last reported)")
    func versionsAndSilentWorkers() async throws {
        for (id, dc) in [("east-1", "east"), ("west-1", "west")] { try await heartbeat(id, dc: dc, ttlSeconds: 600) }
        // west-1 last heard from ten minutes ago (its heartbeat's score is the time it was seen, on Redis's clock)
        let now = try await redis.time().milliseconds
        _ = try await redis.send(["ZADD", Keys.workers, String(now - 600_000), "west-1"])
        let table = try await ctl("workers")
        let row = { (id: String) in table.out.split(separator: "\n").first { $0.hasPrefix(id) }.map(String.init) ?? "" }
        #expect(table.out.split(separator: "\n").first?.hasSuffix("VERSION") == true, "\(table)")
        #expect(row("east-1").contains(" running ") && row("east-1").hasSuffix(TandemVersion.current), "\(table)")
        #expect(row("west-1").contains(" gone? ") && !row("west-1").contains(" running "), "\(table)")
        let j = try #require(try await ctl("workers", "--json").json() as? [[String: Any]])
        #expect(j.map { $0["silent"] as? Bool } == [false, true] && j.allSatisfy { $0["version"] as? String == TandemVersion.current }, "\(j)")
        for binary in ["executorctl", "swift-worker", "swift-dispatcher"] {
            let v = try await offPool { () -> String in
                let p = Process()
                p.executableURL = URL(fileURLWithPath: try Repo.binary(binary))
                p.arguments = ["--version"]
                let pipe = Pipe()
                p.standardOutput = pipe
                try p.run()
                p.waitUntilExit()
                return String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            }
            #expect(v == TandemVersion.current + "\n", "\(binary) --version: \(v)")
        }
    }

    @Test("error paths: unreachable Redis or Postgres → exit 2 with one line; bad usage → 64")
    func errorPaths() async throws {
        let dead = "redis://127.0.0.1:\(freeLoopbackPort())/0"
        for args in [
            ["queues"], ["workers"], ["dc", "status"], ["dc", "drain", "east"], ["leases"], ["ingress"], ["dlq", "list"],
            ["dlq", "show", "1"], ["dlq", "purge", "--all", "--yes"], ["watch", "--count", "1"], ["queues", "--json"],
        ] {
            let r = try await executorctl(args + ["--broker", dead])
            #expect(r.code == 2, "\(args): \(r)")
            #expect(r.errLines.count == 1, "\(args): one line, got \(r)")
            #expect(r.err.hasPrefix("executorctl: cannot reach Redis: ") && r.err.contains("127.0.0.1"), "\(args): \(r)")
            #expect(r.out.isEmpty)
        }
        let pg = try await executorctl(["task", "x", "--result-backend", "postgresql://u@127.0.0.1:\(freeLoopbackPort())/db"])
        #expect(pg.code == 2 && pg.errLines.count == 1 && pg.err.contains("cannot reach Postgres"), "\(pg)")

        #expect(try await executorctl(["no-such-command"]).code == 64)
        #expect(try await executorctl(["dlq", "purge"]).code == 64, "neither a job nor --all")
        #expect(try await executorctl(["dlq", "purge", "1", "--all"]).code == 64)
        #expect(try await executorctl(["dc", "drain", "bad:name", "--broker", dead]).code == 64)
        #expect(try await executorctl(["watch", "--interval", "0"]).code == 64)
        // a loss threshold under 1.5 heartbeats would show live datacenters as lost; nan used to trap converting it
        for command in [["dc", "status"], ["watch", "--count", "1"]] {
            let short = try await executorctl(command + ["--dc-loss-after", "2", "--broker", dead])
            #expect(short.code == 64 && short.err.contains("--dc-loss-after 2 is too short") && short.err.contains("Use at least 3"), "\(short)")
            let nan = try await executorctl(command + ["--dc-loss-after", "nan", "--broker", dead])
            #expect(nan.code == 64 && nan.err.contains("--dc-loss-after takes a number of seconds"), "\(nan)")
            #expect(try await executorctl(command + ["--dc-loss-after", "3", "--broker", dead]).code == 2, "3 s is accepted (then Redis is unreachable)")
        }
        let noLedger = try await executorctl(["task", "x"])
        #expect(noLedger.code == 64 && noLedger.err.contains("TANDEM_LEDGER_URL"), "\(noLedger)")
    }
}
