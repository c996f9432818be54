import CeleryWire
import Foundation
import Logging
import Postgres
import TandemCore

/// Celery's database result backend (`celery_taskmeta`) and Tandem's ledger, in one Postgres database so that a
/// result write can check the lease's fencing token in the same transaction.
public final class PostgresStore: StoreOperationSink {
    public let client: PostgresClient

    let committer: GroupCommitter
    /// Connections that commit batches concurrently.
    static let writeConnections = 4

    public init(configuration: PostgresConfiguration, logger: Logger) {
        client = PostgresClient(configuration: configuration, label: "results", logger: logger)
        // the first connection also serves reads and migrations; the others only commit batches
        committer = GroupCommitter(
            clients: [client]
                + (1..<Self.writeConnections).map {
                    PostgresClient(configuration: configuration, label: "results-\($0)", logger: logger)
                })
    }

    /// Connects and creates missing tables.
    public func prepare() async throws {
        try await client.connect()
        try await Schema.migrate(client)
        await committer.connectAll()
    }

    public func close() { committer.close() }

    // MARK: Operations
    //
    // Every write is a `StoreOperation` applied inside a transaction, so the spool (SpoolingStore) can replay
    // exactly the same writes later, each in the same transaction as its progress marker.

    /// Applies one operation, committed together with whatever other writes are waiting (group commit).
    public func apply(_ op: StoreOperation) async throws -> StoreOutcome {
        try await committer.submit(op)
    }

    /// Applies one operation inside `tx`.
    public static func apply(_ op: StoreOperation, in tx: PostgresTransaction) throws -> StoreOutcome {
        switch op {
        case .result(let r):
            if let token = r.fenceToken {
                let current = try tx.query(
                    "SELECT token FROM tandem_tasks WHERE task_id = $1 FOR UPDATE", [.text(r.taskID)]
                ).rows.first?.int("token")
                if let current, current != token {
                    try insertEvent(
                        tx, taskID: r.taskID, jobID: r.fenceJob, event: "fenced", worker: nil, datacenter: nil,
                        token: token, detail: "late \(r.state) refused: the task was claimed again (token \(current))")
                    return .fenced
                }
            }
            let result = try tx.query(
                """
                INSERT INTO celery_taskmeta (id, task_id, status, result, traceback, date_done)
                VALUES (nextval('task_id_sequence'), $1, $2, $3, $4,
                        COALESCE($5::timestamptz, now()) AT TIME ZONE 'UTC')
                \(keepingSuccess)
                """,
                [
                    .text(r.taskID), .text(r.state), r.result.map { .bytea($0) } ?? .null,
                    r.traceback.map { .text($0) } ?? .null, r.dateDone.map { .text($0) } ?? .null,
                ])
            return result.affectedRows == 1 ? .written : .keptSuccess
        case .claimed(let c):
            let r = try tx.query(
                """
                INSERT INTO tandem_tasks (task_id, job_id, task_name, kind, ingress_queue, queue, datacenter,
                    dispatched_at, claimed_by, hostname, token, attempts)
                VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8::bigint / 1000.0), $9, $10, $11, $12)
                ON CONFLICT (task_id) DO UPDATE
                   SET job_id = excluded.job_id, ingress_queue = excluded.ingress_queue, queue = excluded.queue,
                       datacenter = excluded.datacenter, dispatched_at = excluded.dispatched_at,
                       claimed_by = excluded.claimed_by, hostname = excluded.hostname, token = excluded.token,
                       attempts = excluded.attempts, pid = NULL, started_at = NULL, finished_at = NULL,
                       outcome = NULL, exit_status = NULL, updated_at = now()
                 WHERE tandem_tasks.token < excluded.token
                """,
                [
                    .text(c.taskID), .text(c.jobID), .text(c.taskName), .text(c.kind), .text(c.ingressList),
                    .text(c.queue), .text(c.datacenter), .int(c.dispatchedAtMs), .text(c.workerID),
                    .text(c.hostname), .int(c.token), .int(Int64(c.attempts)),
                ])
            let ok = r.affectedRows == 1
            // the same claim again (a retry after a reply was lost): already on record, nothing to add
            if !ok, try attemptOnRecord(tx, taskID: c.taskID, token: c.token) { return .done }
            try insertEvent(
                tx, taskID: c.taskID, jobID: c.jobID, event: ok ? "claimed" : "fenced", worker: c.workerID,
                datacenter: c.datacenter, token: c.token,
                detail: ok ? "attempt \(c.attempts) on \(c.hostname)" : "a newer claim is already recorded")
            return ok ? .done : .fenced
        case .started(let e):
            let updated = try tx.query(
                """
                UPDATE tandem_tasks SET started_at = now(), pid = $3, updated_at = now()
                 WHERE task_id = $1 AND token = $2 AND started_at IS NULL
                """, [.text(e.taskID), .int(e.token), .int(Int64(e.pid))])
            // this attempt's start already on record (the same write again): nothing to add
            if updated.affectedRows == 0, try attemptOnRecord(tx, taskID: e.taskID, token: e.token, where: "started_at IS NOT NULL") {
                return .done
            }
            try insertEvent(
                tx, taskID: e.taskID, jobID: e.jobID, event: "started", worker: nil, datacenter: e.datacenter,
                token: e.token, detail: "pid \(e.pid)")
            return .done
        case .finished(let f):
            let updated = try tx.query(
                """
                UPDATE tandem_tasks SET finished_at = now(), outcome = $3, exit_status = $4, updated_at = now()
                 WHERE task_id = $1 AND token = $2 AND finished_at IS NULL
                """, [.text(f.taskID), .int(f.token), .text(f.outcome), f.exitStatus.map { .int(Int64($0)) } ?? .null])
            if updated.affectedRows == 0 {
                // this attempt's end already on record (the same write again): done; otherwise a stale attempt,
                // whose end is not history (its refused result already recorded it as fenced)
                return try attemptOnRecord(tx, taskID: f.taskID, token: f.token, where: "finished_at IS NOT NULL") ? .done : .fenced
            }
            try insertEvent(
                tx, taskID: f.taskID, jobID: f.jobID, event: f.outcome.lowercased(), worker: nil,
                datacenter: f.datacenter, token: f.token, detail: f.detail)
            return .done
        case .event(let e):
            try insertEvent(
                tx, taskID: e.taskID, jobID: e.jobID, event: e.event, worker: e.worker, datacenter: e.datacenter,
                token: e.token, detail: e.detail)
            return .done
        case .began, .completed:
            let plan = pipelined(op)!
            return try plan.outcome(plan.statements.map { try tx.query($0.sql, $0.binds) })
        case .sequence(let ops):
            var last: StoreOutcome = .done
            for op in ops {
                last = try apply(op, in: tx)
                if last == .fenced { return .fenced }
            }
            return last
        }
    }


    // MARK: One statement per operation (the hot path)

    /// A statement and its parameters.
    public typealias Statement = (sql: String, binds: [PostgresBind])
    /// An operation's statements and how to read its outcome from their results.
    typealias Plan = (statements: [Statement], outcome: ([PostgresResult]) -> StoreOutcome)

    /// The outcome of each plan, from the results of all their statements run one after the other.
    static func outcomes(of plans: [Plan], from results: [PostgresResult]) -> [StoreOutcome] {
        var rest = results[...]
        return plans.map { plan in
            defer { rest = rest.dropFirst(plan.statements.count) }
            return plan.outcome(Array(rest.prefix(plan.statements.count)))
        }
    }

    /// The statements of an operation that needs no answer from one statement to build the next — so a batch of
    /// them can go to Postgres in one round trip (`PostgresClient.pipeline`) — and how to read its outcome from
    /// their results. nil: the operation is applied statement by statement (`apply(_:in:)`).
    static func pipelined(_ op: StoreOperation) -> Plan? {
        switch op {
        case .began(let c, let pid, let r):
            return ([beganStatement(c, pid: pid, started: r)], { $0.first?.rows.first?.int("claimed") == 1 ? .done : .fenced })
        case .completed(let r, let f):
            return ([completedStatement(r, f)], { results in
                let row = results.first?.rows.first
                if (row?.int("allowed") ?? 0) == 0 { return .fenced }
                return (row?.int("written") ?? 0) > 0 ? .written : .keptSuccess
            })
        case .sequence(let ops):
            // a quick task's whole attempt (its start was never written on its own): one statement that writes the
            // final state at once — one row version each in tandem_tasks and celery_taskmeta instead of two
            if ops.count == 2, case .began(let c, let pid, _) = ops[0], case .completed(let r, let f) = ops[1],
                f.token == c.token, f.taskID == c.taskID, r.taskID == c.taskID
            {
                return ([ranAndEndedStatement(c, pid: pid, result: r, finish: f)], { results in
                    let row = results.first?.rows.first
                    if (row?.int("claimed") ?? 0) == 0 { return .fenced }
                    return (row?.int("written") ?? 0) > 0 ? .written : .keptSuccess
                })
            }
            // every part runs (a fenced start makes the end refuse itself too); the outcome is as `apply`'s
            let parts = ops.map(pipelined)
            guard !parts.isEmpty, parts.allSatisfy({ $0 != nil }) else { return nil }
            let plans = parts.map { $0! }
            return (plans.flatMap(\.statements), { results in
                let each = outcomes(of: plans, from: results)
                return each.contains(.fenced) ? .fenced : each.last ?? .done
            })
        default:
            return nil
        }
    }

    /// The start of an attempt: the claim (only over an older token), its `claimed` and `started` events and Celery's
    /// STARTED. The row lock the INSERT ... ON CONFLICT takes is the fencing check, so STARTED needs no
    /// SELECT ... FOR UPDATE. Returns one row: `claimed` = 1, or 0 when a newer claim is on record (then only a
    /// `fenced` event is written).
    static func beganStatement(_ c: StoreOperation.Claim, pid: Int32, started r: StoreOperation.ResultWrite) -> Statement {
        (
            """
            WITH \(priorCTE), \(claimCTE(ending: false)),
            events AS (
                INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail)
                SELECT $1::text, $2::text, e.event, e.worker, $7::text, $11::bigint, e.detail
                  FROM (VALUES (1, 'claimed', $9::text, $14::text), (2, 'started', NULL, $15::text))
                       AS e(n, event, worker, detail)
                 WHERE EXISTS (SELECT 1 FROM claim) AND NOT EXISTS (SELECT 1 FROM prior)
                UNION ALL
                SELECT $1::text, $2::text, 'fenced', $9::text, $7::text, $11::bigint, 'a newer claim is already recorded'
                 WHERE NOT EXISTS (SELECT 1 FROM claim) AND NOT EXISTS (SELECT 1 FROM prior)),
            started AS (\(resultUpsert(from: "claim", first: 16)))
            SELECT (EXISTS (SELECT 1 FROM claim) OR EXISTS (SELECT 1 FROM prior))::int AS claimed
            """,
            claimBinds(c, pid: pid) + resultBinds(r)
        )
    }

    /// A quick attempt from claim to end in one statement: what `beganStatement` then `completedStatement` write
    /// together, minus the intermediate row versions (STARTED, and the ledger row without its end). Same events,
    /// in the same order: `claimed`, `started`, the outcome — or, when a newer claim is on record, the two `fenced`
    /// events the pair writes. Returns one row: `claimed` (0 = fenced) and `written` (0 = a SUCCESS was there).
    static func ranAndEndedStatement(
        _ c: StoreOperation.Claim, pid: Int32, result r: StoreOperation.ResultWrite, finish f: StoreOperation.Finish
    ) -> Statement {
        (
            """
            WITH \(priorCTE), \(claimCTE(ending: true)),
            events AS (
                INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail)
                SELECT $1::text, $2::text, e.event, e.worker, $7::text, $11::bigint, e.detail
                  FROM (VALUES (1, 'claimed', $9::text, $14::text), (2, 'started', NULL, $15::text),
                               (3, lower($20::text), NULL, $22::text))
                       AS e(n, event, worker, detail)
                 WHERE EXISTS (SELECT 1 FROM claim) AND (e.n = 3 OR NOT EXISTS (SELECT 1 FROM prior))
                UNION ALL
                SELECT $1::text, $2::text, e.event, e.worker, e.dc, $11::bigint, e.detail
                  FROM (VALUES (1, 'fenced', $9::text, $7::text, 'a newer claim is already recorded'),
                               (2, 'fenced', NULL, NULL,
                                \(lateRefusal(status: 16))))
                       AS e(n, event, worker, dc, detail)
                 WHERE NOT EXISTS (SELECT 1 FROM claim) AND NOT EXISTS (SELECT 1 FROM prior)),
            result AS (\(resultUpsert(from: "claim", first: 16)) RETURNING 1)
            SELECT (EXISTS (SELECT 1 FROM claim) OR EXISTS (SELECT 1 FROM prior))::int AS claimed,
                   (SELECT count(*) FROM result) + (SELECT count(*) FROM prior WHERE ended) AS written
            """,
            claimBinds(c, pid: pid) + resultBinds(r) + [
                .text(f.outcome), f.exitStatus.map { .int(Int64($0)) } ?? .null, f.detail.map { .text($0) } ?? .null,
            ]
        )
    }

    /// The end of an attempt: the ledger's end (only for the current token), the result (only when this attempt is
    /// current, or the task has no ledger row at all) and one event saying which happened. Returns one row:
    /// `allowed` (0 = refused, a newer claim holds the task) and `written` (0 = a SUCCESS was already there).
    /// The same end applied again (`ended`: this attempt's end already on record, a retry after a lost reply)
    /// is allowed but neither moves the ledger's end nor adds a second outcome event.
    static func completedStatement(_ r: StoreOperation.ResultWrite, _ f: StoreOperation.Finish) -> Statement {
        (
            """
            WITH ended AS (SELECT 1 FROM tandem_tasks WHERE task_id = $1 AND token = $6 AND finished_at IS NOT NULL),
            fin AS (
                UPDATE tandem_tasks SET finished_at = now(), outcome = $9, exit_status = $10::integer, updated_at = now()
                 WHERE task_id = $1 AND token = $6 AND finished_at IS NULL
                RETURNING task_id),
            allowed AS (
                SELECT 1 FROM fin
                UNION ALL
                SELECT 1 FROM ended
                UNION ALL
                SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM tandem_tasks WHERE task_id = $1)),
            result AS (\(resultUpsert(from: "allowed", first: 2)) RETURNING 1),
            events AS (
                INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail)
                SELECT $1::text, $7::text, lower($9::text), NULL, $8::text, $6::bigint, $11::text FROM fin
                UNION ALL
                SELECT $1::text, $7::text, 'fenced', NULL, NULL, $6::bigint,
                       \(lateRefusal(status: 2))
                 WHERE NOT EXISTS (SELECT 1 FROM allowed))
            SELECT (SELECT count(*) FROM allowed) AS allowed, (SELECT count(*) FROM result) AS written
            """,
            [.text(r.taskID)] + resultBinds(r) + [
                .int(f.token), .text(f.jobID), .text(f.datacenter), .text(f.outcome),
                f.exitStatus.map { .int(Int64($0)) } ?? .null, f.detail.map { .text($0) } ?? .null,
            ]
        )
    }

    /// `claim AS (…)`: an attempt's ledger row, written only over an older token (the row lock of the INSERT …
    /// ON CONFLICT is the fencing check); it yields the task id when this claim is now the one on record, or when this
    /// very claim is on record with no end yet (the same attempt again: its start written again, or its end added). Binds
    /// $1–$15 (`claimBinds`); `ending` records the attempt's end in the same row ($20 outcome, $21 exit status),
    /// otherwise the end columns are cleared.
    static func claimCTE(ending: Bool) -> String {
        """
        claim AS (
            INSERT INTO tandem_tasks (task_id, job_id, task_name, kind, ingress_queue, queue, datacenter,
                dispatched_at, claimed_by, hostname, token, attempts, pid, started_at\(ending ? ", finished_at, outcome, exit_status" : ""))
            VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8::bigint / 1000.0), $9, $10, $11, $12, $13,
                    now()\(ending ? ", now(), $20, $21::integer" : ""))
            ON CONFLICT (task_id) DO UPDATE
               SET job_id = excluded.job_id, ingress_queue = excluded.ingress_queue, queue = excluded.queue,
                   datacenter = excluded.datacenter, dispatched_at = excluded.dispatched_at,
                   claimed_by = excluded.claimed_by, hostname = excluded.hostname, token = excluded.token,
                   attempts = excluded.attempts, pid = excluded.pid, started_at = excluded.started_at,
                   finished_at = excluded.finished_at, outcome = excluded.outcome, exit_status = excluded.exit_status,
                   updated_at = now()
             WHERE tandem_tasks.token < excluded.token
                OR (tandem_tasks.token = excluded.token AND tandem_tasks.finished_at IS NULL)
            RETURNING task_id)
        """
    }

    /// Whether attempt `token` of `taskID` is on record (its row also meeting `condition`): a write refused for
    /// that reason is the same attempt's write applied again, not a stale one. Asked only after a refusal.
    static func attemptOnRecord(_ tx: PostgresTransaction, taskID: String, token: Int64, where condition: String = "TRUE")
        throws -> Bool
    {
        try !tx.query(
            "SELECT 1 FROM tandem_tasks WHERE task_id = $1 AND token = $2 AND \(condition)", [.text(taskID), .int(token)]
        ).rows.isEmpty
    }

    /// `prior AS (…)`: this attempt ($1, token $11) already on record — the same write applied again after its
    /// reply was lost (the group committer's retry, the spool's replay). Read from the statement's snapshot, before
    /// `claim` writes. Such a write is this attempt's, not a stale one: it is accepted, its start's events are not
    /// written twice, and an end already on record is not written again (`ended`).
    static let priorCTE = """
        prior AS (SELECT finished_at IS NOT NULL AS ended FROM tandem_tasks WHERE task_id = $1 AND token = $11)
        """

    /// `claimCTE`'s binds $1–$15: the claim, the pid and the details of the `claimed` and `started` events.
    static func claimBinds(_ c: StoreOperation.Claim, pid: Int32) -> [PostgresBind] {
        [
            .text(c.taskID), .text(c.jobID), .text(c.taskName), .text(c.kind), .text(c.ingressList),
            .text(c.queue), .text(c.datacenter), .int(c.dispatchedAtMs), .text(c.workerID),
            .text(c.hostname), .int(c.token), .int(Int64(c.attempts)), .int(Int64(pid)),
            .text("attempt \(c.attempts) on \(c.hostname)"), .text("pid \(pid)"),
        ]
    }

    /// Celery's result row for task $1, written once per row of `source` (none: nothing written), from
    /// `resultBinds` at $`first` (status) to $`first + 3` (date_done); an existing SUCCESS is kept.
    static func resultUpsert(from source: String, first: Int) -> String {
        """
        INSERT INTO celery_taskmeta (id, task_id, status, result, traceback, date_done)
        SELECT nextval('task_id_sequence'), $1::text, $\(first)::text, $\(first + 1)::bytea, $\(first + 2)::text,
               COALESCE($\(first + 3)::timestamptz, now()) AT TIME ZONE 'UTC'
          FROM \(source)
        \(keepingSuccess)
        """
    }

    /// The detail of the `fenced` event of an end refused because task $1 was claimed again (status at $`status`).
    static func lateRefusal(status: Int) -> String {
        """
        'late ' || $\(status)::text || ' refused: the task was claimed again (token '
            || coalesce((SELECT token::text FROM tandem_tasks WHERE task_id = $1), '?') || ')'
        """
    }

    /// How every write of a Celery result row meets an existing one: it replaces it, unless that row is a SUCCESS
    /// (Celery's readers must never see a SUCCESS turn into anything else).
    static let keepingSuccess = """
        ON CONFLICT (task_id) DO UPDATE
           SET status = excluded.status, result = excluded.result, traceback = excluded.traceback,
               date_done = excluded.date_done
         WHERE celery_taskmeta.status IS DISTINCT FROM 'SUCCESS'
        """

    /// A result row's values as the statements above take them: status, result, traceback, date_done (4 binds,
    /// after the task id where a statement has it first).
    static func resultBinds(_ r: StoreOperation.ResultWrite) -> [PostgresBind] {
        [
            .text(r.state), r.result.map { .bytea($0) } ?? .null, r.traceback.map { .text($0) } ?? .null,
            r.dateDone.map { .text($0) } ?? .null,
        ]
    }

    static func insertEvent(
        _ tx: PostgresTransaction, taskID: String, jobID: String?, event: String, worker: String?,
        datacenter: String?, token: Int64?, detail: String?
    ) throws {
        _ = try tx.query(
            "INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                .text(taskID), jobID.map { .text($0) } ?? .null, .text(event), worker.map { .text($0) } ?? .null,
                datacenter.map { .text($0) } ?? .null, token.map { .int($0) } ?? .null, detail.map { .text($0) } ?? .null,
            ])
    }

    // MARK: ResultBackend and TaskLedger (the writes come from StoreOperationSink)

    public func perform(_ op: StoreOperation) async throws -> StoreOutcome { try await apply(op) }

    public func state(taskID: String) async throws -> CeleryState {
        let r = try await client.query("SELECT status FROM celery_taskmeta WHERE task_id = $1", [.text(taskID)])
        return r.rows.first?.string("status").flatMap(CeleryState.init(rawValue:)) ?? .pending
    }

    public func entry(taskID: String) async throws -> LedgerEntry? {
        let r = try await client.query(
            """
            SELECT task_id, job_id, task_name, ingress_queue, datacenter, dispatched_at::text AS dispatched_at,
                   claimed_by, token, attempts, started_at::text AS started_at, finished_at::text AS finished_at,
                   outcome, exit_status
              FROM tandem_tasks WHERE task_id = $1
            """, [.text(taskID)])
        let ev = try await client.query(
            """
            SELECT at::text AS at, event, worker, datacenter, token, detail
              FROM tandem_task_events WHERE task_id = $1 ORDER BY id
            """, [.text(taskID)])
        let events = ev.rows.map {
            LedgerEvent(
                at: $0.string("at") ?? "", event: $0.string("event") ?? "", worker: $0.string("worker"),
                datacenter: $0.string("datacenter"), token: $0.int("token"), detail: $0.string("detail"))
        }
        guard let row = r.rows.first else {
            if events.isEmpty { return nil }
            return LedgerEntry(
                taskID: taskID, jobID: "", taskName: "", ingressQueue: "", datacenter: "", dispatchedAt: nil,
                claimedBy: nil, token: 0, attempts: 0, startedAt: nil, finishedAt: nil, outcome: nil, exitStatus: nil,
                events: events)
        }
        return LedgerEntry(
            taskID: taskID, jobID: row.string("job_id") ?? "", taskName: row.string("task_name") ?? "",
            ingressQueue: row.string("ingress_queue") ?? "", datacenter: row.string("datacenter") ?? "",
            dispatchedAt: row.string("dispatched_at"), claimedBy: row.string("claimed_by"),
            token: row.int("token") ?? 0, attempts: Int(row.int("attempts") ?? 0), startedAt: row.string("started_at"),
            finishedAt: row.string("finished_at"), outcome: row.string("outcome"),
            exitStatus: row.int("exit_status").map { Int($0) }, events: events)
    }
}
