import CeleryWire
import Foundation
import Logging
import Postgres
import TandemCore
@testable import TandemPostgres
import Testing
import TestSupport

/// The Postgres result backend and ledger against a real Postgres: schema, no SUCCESS overwrite, fencing.
@Suite("Postgres result store and ledger (real Postgres)")
struct PostgresStoreTests {
    let store: PostgresStore
    let pg: PostgresClient

    init() async throws {
        let url = try PostgresServer.shared().createDatabase()
        store = PostgresStore(configuration: try PostgresConfiguration(url: "db+postgresql://" + url.dropFirst("postgresql://".count)), logger: Logger(label: "t"))
        try await store.prepare()
        pg = PostgresClient(configuration: try PostgresConfiguration(url: url), logger: Logger(label: "t"))
    }

    func job(_ id: String, token: Int64, attempts: Int = 1) -> ClaimedJob {
        ClaimedJob(jobID: id, token: token, attempts: attempts, raw: [], ingressList: "default", queue: "default",
            datacenter: "east", dispatchedAtMs: 1_700_000_000_000, leaseDeadlineMs: 0)
    }

    func facts(_ task: String, worker: String = "w1") -> TaskFacts {
        TaskFacts(taskID: task, taskName: "execute_command", kind: "command", workerID: worker, hostname: "h")
    }

    /// Runs `write` for every id at once (one of them a bad write) and checks that every good write was written and
    /// the bad one alone failed.
    func expectConcurrentWrites(
        _ ids: [String], bad: String, _ write: @escaping @Sendable (Int, String) async throws -> ResultWriteOutcome
    ) async {
        let outcomes = await withTaskGroup(of: (String, Result<ResultWriteOutcome, any Error>).self) { group in
            for (n, id) in (ids + [bad]).enumerated() {
                group.addTask {
                    do { return (id, .success(try await write(n, id))) } catch { return (id, .failure(error)) }
                }
            }
            var out: [String: Result<ResultWriteOutcome, any Error>] = [:]
            for await (id, r) in group { out[id] = r }
            return out
        }
        for id in ids {
            guard case .success(let o)? = outcomes[id] else {
                Issue.record("\(id) failed: \(String(describing: outcomes[id]))")
                continue
            }
            #expect(o == .written)
        }
        if case .success? = outcomes[bad] { Issue.record("a 300-character task id must be refused") }
    }

    @Test("creates Celery's table and sequence the way Celery's model has them, and migrating twice is harmless")
    func schema() async throws {
        try await Schema.migrate(store.client)
        let cols = try await pg.query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'celery_taskmeta' ORDER BY ordinal_position")
        let names = cols.rows.compactMap { $0.string("column_name") }
        #expect(Array(names.prefix(6)) == ["id", "task_id", "status", "result", "date_done", "traceback"])
        #expect(cols.rows.first { $0.string("column_name") == "result" }?.string("data_type") == "bytea")
        #expect(cols.rows.first { $0.string("column_name") == "date_done" }?.string("data_type") == "timestamp without time zone")
        let seq = try await pg.query("SELECT count(*) AS n FROM pg_class WHERE relname = 'task_id_sequence' AND relkind = 'S'")
        #expect(seq.rows.first?.int("n") == 1)
    }

    @Test("STARTED then SUCCESS; a later FAILURE never overwrites the SUCCESS; date_done is UTC")
    func neverOverwritesSuccess() async throws {
        let j = job("1", token: 10)
        #expect(try await store.claimed(j, facts: facts("t-success")) == .done)
        let fence = Fence(jobID: "1", token: 10)
        #expect(try await store.store(.started(taskId: "t-success", pid: 42, hostname: "h"), fence: fence) == .written)
        #expect(try await store.state(taskID: "t-success") == .started)
        #expect(try await store.store(.success(taskId: "t-success"), fence: fence) == .written)
        #expect(try await store.store(ResultRecord(taskId: "t-success", state: .failure), fence: fence) == .keptSuccess)
        #expect(try await store.state(taskID: "t-success") == .success)
        let r = try await pg.query(
            "SELECT result, abs(extract(epoch from (date_done - (now() AT TIME ZONE 'UTC')))) AS skew FROM celery_taskmeta WHERE task_id = 't-success'")
        #expect((Double(r.rows.first?.string("skew") ?? "99") ?? 99) < 60)
        // microseconds, as Celery writes date_done (not whole seconds)
        let frac = try await pg.query("SELECT extract(microseconds FROM date_done)::bigint % 1000000 AS us FROM celery_taskmeta WHERE task_id = 't-success'")
        #expect(frac.rows.first?.int("us") != 0)
        // SUCCESS result is a safe pickle of None
        let bytes = try #require(r.rows.first?.bytea("result"))
        #expect(try SafePickle.loads(bytes) == .null)
    }

    @Test("a stale fencing token can neither claim in the ledger nor write a result")
    func fencing() async throws {
        #expect(try await store.claimed(job("5", token: 20), facts: facts("t-fence", worker: "old")) == .done)
        #expect(try await store.claimed(job("5", token: 25, attempts: 2), facts: facts("t-fence", worker: "new")) == .done)
        // the old holder comes back from a freeze
        #expect(try await store.claimed(job("5", token: 20), facts: facts("t-fence", worker: "old")) == .fenced)
        #expect(try await store.store(.success(taskId: "t-fence"), fence: Fence(jobID: "5", token: 20)) == .fenced)
        #expect(try await store.state(taskID: "t-fence") == .pending)
        #expect(try await store.store(ResultRecord(taskId: "t-fence", state: .failure), fence: Fence(jobID: "5", token: 25)) == .written)
        let e = try #require(try await store.entry(taskID: "t-fence"))
        #expect(e.token == 25 && e.attempts == 2 && e.claimedBy == "new")
        // the refused claim and the refused result are both on record
        #expect(e.events.map(\.event) == ["claimed", "claimed", "fenced", "fenced"])
    }

    @Test("the ledger keeps a task's history: claim, start, finish with exit status")
    func history() async throws {
        let j = job("9", token: 3)
        _ = try await store.claimed(j, facts: facts("t-hist"))
        try await store.started(j, taskID: "t-hist", pid: 1234)
        try await store.finished(j, taskID: "t-hist", outcome: "FAILURE", exitStatus: 3, detail: "task exit status 3")
        let e = try #require(try await store.entry(taskID: "t-hist"))
        #expect(e.outcome == "FAILURE" && e.exitStatus == 3 && e.startedAt != nil && e.finishedAt != nil)
        #expect(e.dispatchedAt?.hasPrefix("2023-11-14") == true)
        #expect(e.events.map(\.event) == ["claimed", "started", "failure"])
        #expect(try await store.entry(taskID: "nope") == nil)
    }

    @Test("group commit: concurrent writes share transactions, and one bad write fails alone")
    func groupCommit() async throws {
        let store = self.store
        let ids = (0..<60).map { "gc-\($0)" }
        let bad = String(repeating: "x", count: 300)  // longer than celery_taskmeta.task_id VARCHAR(155)
        await expectConcurrentWrites(ids, bad: bad) { _, id in try await store.store(.success(taskId: id), fence: nil) }
        let n = try await pg.query("SELECT count(*) AS n FROM celery_taskmeta WHERE task_id LIKE 'gc-%'")
        #expect(n.rows.first?.int("n") == 60)
    }

    @Test("a batch that fails because Postgres stopped answering fails whole, at once: its writes are not retried one by one (each would wait out a connect timeout before the worker could spool it)")
    func outageFailsTheBatchWhole() async throws {
        let url = try #require(URLComponents(string: try PostgresServer.shared().createDatabase()))
        let link = try FaultProxy(upstreamPort: try #require(url.port))
        defer { link.stop() }
        var config = try PostgresConfiguration(url: "postgresql://postgres@127.0.0.1:\(link.port)\(url.path)")
        config.replyTimeout = .seconds(1)
        let store = PostgresStore(configuration: config, logger: Logger(label: "t"))
        defer { store.close() }
        try await store.prepare()
        #expect(try await store.store(.success(taskId: "before"), fence: nil) == .written)
        link.partition()
        let connectsBefore = link.connectionsAccepted
        let failures = await withTaskGroup(of: (any Error)?.self) { group in
            for i in 0..<12 {
                group.addTask {
                    do {
                        _ = try await store.store(.success(taskId: "cut-\(i)"), fence: nil)
                        return nil
                    } catch { return error }
                }
            }
            return await group.reduce(into: [any Error]()) { if let e = $1 { $0.append(e) } }
        }
        let reconnects = link.connectionsAccepted - connectsBefore
        link.heal()
        #expect(failures.count == 12)
        #expect(failures.allSatisfy { ($0 as? PostgresError)?.isOutage == true }, "\(failures)")
        // at most one new connection per committing connection (4), never one per write
        #expect(reconnects <= PostgresStore.writeConnections, "\(reconnects) connection(s) opened for 12 writes during the outage")
    }

    @Test("pipelined group commit: many attempts' starts and ends in one round trip each batch; one bad write fails alone")
    func pipelinedGroupCommit() async throws {
        let store = self.store
        let ids = (0..<80).map { "pl-\($0)" }
        let bad = String(repeating: "y", count: 300)  // longer than celery_taskmeta.task_id VARCHAR(155)
        await expectConcurrentWrites(ids, bad: bad) { n, id in
            let j = ClaimedJob(jobID: "\(n)", token: Int64(1000 + n), attempts: 1, raw: [], ingressList: "default", queue: "default",
                datacenter: "east", dispatchedAtMs: 1_700_000_000_000, leaseDeadlineMs: 0)
            let f = TaskFacts(taskID: id, taskName: "execute_command", kind: "command", workerID: "w", hostname: "h")
            return try await store.ranAndEnded(
                j, facts: f, pid: 1, started: .started(taskId: id, pid: 1, hostname: "h"), result: .success(taskId: id),
                outcome: "SUCCESS", exitStatus: 0, detail: nil)
        }
        let n = try await pg.query("SELECT count(*) AS n FROM celery_taskmeta WHERE task_id LIKE 'pl-%' AND status = 'SUCCESS'")
        #expect(n.rows.first?.int("n") == 80)
        let ev = try await pg.query("SELECT count(*) AS n FROM tandem_task_events WHERE task_id LIKE 'pl-%'")
        #expect(ev.rows.first?.int("n") == 240)  // claimed, started, success — each once
        // nothing of the bad write is left behind, though its neighbours committed
        let left = try await pg.query("SELECT count(*) AS n FROM tandem_tasks WHERE task_id = $1", [.text(bad)])
        #expect(left.rows.first?.int("n") == 0)
    }

    @Test("the start of an attempt in one write: claim, start and STARTED together; a stale claim writes nothing")
    func beganInOneWrite() async throws {
        let j = job("21", token: 40)
        #expect(try await store.began(j, facts: facts("t-began"), pid: 77, started: .started(taskId: "t-began", pid: 77, hostname: "h")) == .done)
        #expect(try await store.state(taskID: "t-began") == .started)
        let e = try #require(try await store.entry(taskID: "t-began"))
        #expect(e.token == 40 && e.startedAt != nil)
        #expect(e.events.map(\.event) == ["claimed", "started"])
        // an older claim of the same task arrives late: refused, and no STARTED overwrites anything
        #expect(try await store.store(.success(taskId: "t-began"), fence: Fence(jobID: "21", token: 40)) == .written)
        let stale = job("20", token: 39)
        #expect(try await store.began(stale, facts: facts("t-began", worker: "late"), pid: 78, started: .started(taskId: "t-began", pid: 78, hostname: "h")) == .fenced)
        #expect(try await store.state(taskID: "t-began") == .success)
        let after = try #require(try await store.entry(taskID: "t-began"))
        #expect(after.token == 40 && after.claimedBy == "w1")
        #expect(after.events.map(\.event) == ["claimed", "started", "fenced"])
    }

    @Test("a quick attempt in one statement: final state at once, the same history as start + end; stale refused; SUCCESS kept")
    func ranAndEndedInOneStatement() async throws {
        func quick(_ j: ClaimedJob, _ task: String, _ state: CeleryState, worker: String = "w1") async throws -> ResultWriteOutcome {
            try await store.ranAndEnded(
                j, facts: facts(task, worker: worker), pid: 55, started: .started(taskId: task, pid: 55, hostname: "h"),
                result: ResultRecord(taskId: task, state: state), outcome: state.rawValue,
                exitStatus: state == .success ? 0 : 1, detail: state == .success ? nil : "boom")
        }
        #expect(try await quick(job("41", token: 80), "t-quick", .failure) == .written)
        #expect(try await store.state(taskID: "t-quick") == .failure)
        var e = try #require(try await store.entry(taskID: "t-quick"))
        #expect(e.token == 80 && e.outcome == "FAILURE" && e.exitStatus == 1 && e.startedAt != nil && e.finishedAt != nil)
        #expect(e.events.map(\.event) == ["claimed", "started", "failure"])
        #expect(e.events.last?.detail == "boom")
        // a retry's quick attempt (newer token) replaces the FAILURE; a stale one is refused with both fenced events
        #expect(try await quick(job("42", token: 81, attempts: 2), "t-quick", .success) == .written)
        #expect(try await quick(job("40", token: 79), "t-quick", .failure, worker: "late") == .fenced)
        #expect(try await store.state(taskID: "t-quick") == .success)
        e = try #require(try await store.entry(taskID: "t-quick"))
        #expect(e.token == 81 && e.outcome == "SUCCESS" && e.claimedBy == "w1")
        #expect(e.events.map(\.event) == ["claimed", "started", "failure", "claimed", "started", "success", "fenced", "fenced"])
        #expect(e.events.last?.detail?.contains("token 81") == true)

        // the same attempt reporting again cannot turn a SUCCESS into a FAILURE
        #expect(try await quick(job("43", token: 82, attempts: 3), "t-quick", .failure) == .keptSuccess)
        #expect(try await store.state(taskID: "t-quick") == .success)
    }

    /// A write whose commit landed but whose reply was lost (the connection dropped) is applied again: by the group
    /// committer's write-by-write retry, or by the spool's replay. It is the same attempt (same fencing token), so it
    /// must be accepted — a `.fenced` here made the worker kill a healthy task, or leave a finished one unacked to
    /// be reclaimed and run again — and it must not write the attempt's history twice.
    @Test("an attempt's own write applied twice (a retry after a lost reply) is accepted, not fenced, and not recorded twice")
    func sameAttemptAppliedTwice() async throws {
        // the start of an attempt
        let a = job("51", token: 90)
        let started = ResultRecord.started(taskId: "t-twice", pid: 12, hostname: "h")
        #expect(try await store.began(a, facts: facts("t-twice"), pid: 12, started: started) == .done)
        #expect(try await store.began(a, facts: facts("t-twice"), pid: 12, started: started) == .done)
        var e = try #require(try await store.entry(taskID: "t-twice"))
        #expect(e.token == 90 && e.startedAt != nil && e.finishedAt == nil)
        #expect(e.events.map(\.event) == ["claimed", "started"])
        // its end, applied twice (the SUCCESS already there the second time)
        #expect(try await store.ended(a, result: .success(taskId: "t-twice"), outcome: "SUCCESS", exitStatus: 0, detail: nil) == .written)
        let firstEnd = try #require(try await store.entry(taskID: "t-twice")).finishedAt
        #expect(try await store.ended(a, result: .success(taskId: "t-twice"), outcome: "SUCCESS", exitStatus: 0, detail: nil) == .keptSuccess)
        #expect(try await store.state(taskID: "t-twice") == .success)
        e = try #require(try await store.entry(taskID: "t-twice"))
        #expect(e.events.map(\.event) == ["claimed", "started", "success"])
        #expect(e.finishedAt == firstEnd, "the end on record stays the first one")

        // a quick attempt in one statement, applied twice (SUCCESS and FAILURE)
        func quick(_ j: ClaimedJob, _ task: String, _ state: CeleryState) async throws -> ResultWriteOutcome {
            try await store.ranAndEnded(
                j, facts: facts(task), pid: 13, started: .started(taskId: task, pid: 13, hostname: "h"),
                result: ResultRecord(taskId: task, state: state), outcome: state.rawValue,
                exitStatus: state == .success ? 0 : 1, detail: state == .success ? nil : "boom")
        }
        for (task, state) in [("t-twice-ok", CeleryState.success), ("t-twice-failed", .failure)] {
            let q = job("52-\(task)", token: 91)
            #expect(try await quick(q, task, state) == .written)
            #expect(try await quick(q, task, state) == .written, "\(task): the retry is the same attempt's write")
            #expect(try await store.state(taskID: task) == state)
            e = try #require(try await store.entry(taskID: task))
            #expect(e.token == 91 && e.outcome == state.rawValue && e.finishedAt != nil)
            #expect(e.events.map(\.event) == ["claimed", "started", state.rawValue.lowercased()], "\(task)")
        }

        // a quick attempt whose start landed although its writer saw an error: the end in one statement still
        // writes the result and the end, and the start's events once
        let b = job("53", token: 92)
        _ = try await store.began(b, facts: facts("t-twice-started"), pid: 14, started: .started(taskId: "t-twice-started", pid: 14, hostname: "h"))
        #expect(try await quick(b, "t-twice-started", .success) == .written)
        #expect(try await store.state(taskID: "t-twice-started") == .success)
        e = try #require(try await store.entry(taskID: "t-twice-started"))
        #expect(e.outcome == "SUCCESS" && e.finishedAt != nil)
        #expect(e.events.map(\.event) == ["claimed", "started", "success"])

        // the claim alone (the ledger beside a Redis result backend)
        let c = job("54", token: 93)
        #expect(try await store.claimed(c, facts: facts("t-twice-claim")) == .done)
        #expect(try await store.claimed(c, facts: facts("t-twice-claim")) == .done)
        e = try #require(try await store.entry(taskID: "t-twice-claim"))
        #expect(e.events.map(\.event) == ["claimed"])
        for _ in 0..<2 { try await store.started(c, taskID: "t-twice-claim", pid: 16) }
        for _ in 0..<2 { try await store.finished(c, taskID: "t-twice-claim", outcome: "FAILURE", exitStatus: 1, detail: "x") }
        e = try #require(try await store.entry(taskID: "t-twice-claim"))
        #expect(e.events.map(\.event) == ["claimed", "started", "failure"])

        // still fenced: an older attempt, after all of the above
        #expect(try await quick(job("50", token: 89), "t-twice-ok", .failure) == .fenced)
        #expect(try await store.began(job("50", token: 89), facts: facts("t-twice"), pid: 15, started: started) == .fenced)
        #expect(try await store.claimed(job("50", token: 89), facts: facts("t-twice-claim")) == .fenced)
        #expect(try await store.state(taskID: "t-twice-ok") == .success)
    }

    @Test("the end of an attempt in one write: result and ledger together; kept SUCCESS; a stale attempt is refused")
    func endedInOneWrite() async throws {
        let j = job("31", token: 50)
        _ = try await store.began(j, facts: facts("t-ended"), pid: 90, started: .started(taskId: "t-ended", pid: 90, hostname: "h"))
        #expect(try await store.ended(j, result: .success(taskId: "t-ended"), outcome: "SUCCESS", exitStatus: 0, detail: nil) == .written)
        #expect(try await store.state(taskID: "t-ended") == .success)
        var e = try #require(try await store.entry(taskID: "t-ended"))
        #expect(e.outcome == "SUCCESS" && e.exitStatus == 0 && e.finishedAt != nil)
        #expect(e.events.map(\.event) == ["claimed", "started", "success"])
        // the same attempt reporting again cannot turn the SUCCESS into a FAILURE
        #expect(try await store.ended(j, result: ResultRecord(taskId: "t-ended", state: .failure), outcome: "FAILURE", exitStatus: 1, detail: "x") == .keptSuccess)
        #expect(try await store.state(taskID: "t-ended") == .success)

        // a newer claim exists: the old attempt's end writes neither the result nor the ledger's end, only "fenced"
        let old = job("32", token: 60)
        let new = job("33", token: 61, attempts: 2)
        _ = try await store.began(old, facts: facts("t-ended-stale", worker: "old"), pid: 91, started: .started(taskId: "t-ended-stale", pid: 91, hostname: "h"))
        _ = try await store.began(new, facts: facts("t-ended-stale", worker: "new"), pid: 92, started: .started(taskId: "t-ended-stale", pid: 92, hostname: "h"))
        #expect(try await store.ended(old, result: ResultRecord(taskId: "t-ended-stale", state: .failure), outcome: "FAILURE", exitStatus: 1, detail: "late") == .fenced)
        #expect(try await store.state(taskID: "t-ended-stale") == .started)
        e = try #require(try await store.entry(taskID: "t-ended-stale"))
        #expect(e.token == 61 && e.outcome == nil && e.finishedAt == nil)
        #expect(e.events.map(\.event) == ["claimed", "started", "claimed", "started", "fenced"])
        #expect(e.events.last?.detail?.contains("token 61") == true)

        // no ledger row at all (a result from outside a claim): written as before
        #expect(try await store.ended(job("34", token: 70), result: .success(taskId: "t-no-ledger"), outcome: "SUCCESS", exitStatus: 0, detail: nil) == .written)
        #expect(try await store.state(taskID: "t-no-ledger") == .success)
    }

    @Test("the combined writes survive the spool's encoding unchanged")
    func combinedOperationsRoundTrip() throws {
        let j = job("41", token: 80)
        let ops: [StoreOperation] = [
            .began(.init(j, facts("t-rt")), pid: 5, started: .init(.started(taskId: "t-rt", pid: 5, hostname: "h"), fence: Fence(jobID: "41", token: 80))),
            .completed(
                .init(.success(taskId: "t-rt"), fence: Fence(jobID: "41", token: 80)),
                .init(taskID: "t-rt", jobID: "41", datacenter: "east", token: 80, outcome: "SUCCESS", exitStatus: 0, detail: nil)),
        ]
        for op in ops {
            let back = try JSONDecoder().decode(StoreOperation.self, from: JSONEncoder().encode(op))
            #expect(back == op)
            #expect(back.taskID == "t-rt")
        }
    }
}
