import CeleryWire
import Foundation
import Logging
import Postgres
import TandemCore

/// Celery's database result backend (`celery_taskmeta`) and Tandem's ledger, in one Postgres database so that a
/// result write can check the lease's fencing token in the same transaction.
public final class PostgresStore: ResultBackend, TaskLedger {
    public let client: PostgresClient

    public init(configuration: PostgresConfiguration, logger: Logger) {
        client = PostgresClient(configuration: configuration, label: "results", logger: logger)
    }

    /// Connects and creates missing tables.
    public func prepare() async throws {
        try await client.connect()
        try await Schema.migrate(client)
    }

    public func close() { client.close() }

    // MARK: ResultBackend

    public func store(_ record: ResultRecord, fence: Fence?) async throws -> ResultWriteOutcome {
        let binds: [PostgresBind] = [
            .text(record.taskId), .text(record.state.rawValue),
            record.databaseResult().map { .bytea($0) } ?? .null,
            record.traceback.map { .text($0) } ?? .null,
        ]
        let token = fence?.token
        return try await client.transaction { tx in
            if let token {
                let current = try tx.query(
                    "SELECT token FROM tandem_tasks WHERE task_id = $1 FOR UPDATE", [.text(record.taskId)]
                ).rows.first?.int("token")
                if let current, current != token { return .fenced }
            }
            let r = try tx.query(
                """
                INSERT INTO celery_taskmeta (id, task_id, status, result, traceback, date_done)
                VALUES (nextval('task_id_sequence'), $1, $2, $3, $4, now() AT TIME ZONE 'UTC')
                ON CONFLICT (task_id) DO UPDATE
                   SET status = excluded.status, result = excluded.result, traceback = excluded.traceback,
                       date_done = excluded.date_done
                 WHERE celery_taskmeta.status IS DISTINCT FROM 'SUCCESS'
                """, binds)
            return r.affectedRows == 1 ? .written : .keptSuccess
        }
    }

    public func state(taskID: String) async throws -> CeleryState {
        let r = try await client.query("SELECT status FROM celery_taskmeta WHERE task_id = $1", [.text(taskID)])
        return r.rows.first?.string("status").flatMap(CeleryState.init(rawValue:)) ?? .pending
    }

    // MARK: TaskLedger

    public func claimed(_ job: ClaimedJob, facts: TaskFacts) async throws -> FencedOutcome {
        let binds: [PostgresBind] = [
            .text(facts.taskID), .text(job.jobID), .text(facts.taskName), .text(facts.kind), .text(job.ingressList),
            .text(job.queue), .text(job.datacenter), .int(job.dispatchedAtMs), .text(facts.workerID),
            .text(facts.hostname), .int(job.token), .int(Int64(job.attempts)),
        ]
        return try await client.transaction { tx in
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
                """, binds)
            let ok = r.affectedRows == 1
            _ = try tx.query(
                """
                INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                """,
                [
                    .text(facts.taskID), .text(job.jobID), .text(ok ? "claimed" : "fenced"), .text(facts.workerID),
                    .text(job.datacenter), .int(job.token),
                    .text(ok ? "attempt \(job.attempts) on \(facts.hostname)" : "a newer claim is already recorded"),
                ])
            return ok ? .done : .fenced
        }
    }

    public func started(_ job: ClaimedJob, taskID: String, pid: Int32) async throws {
        _ = try await client.transaction { tx in
            _ = try tx.query(
                "UPDATE tandem_tasks SET started_at = now(), pid = $3, updated_at = now() WHERE task_id = $1 AND token = $2",
                [.text(taskID), .int(job.token), .int(Int64(pid))])
            _ = try tx.query(
                "INSERT INTO tandem_task_events (task_id, job_id, event, datacenter, token, detail) VALUES ($1, $2, 'started', $3, $4, $5)",
                [.text(taskID), .text(job.jobID), .text(job.datacenter), .int(job.token), .text("pid \(pid)")])
        }
    }

    public func finished(_ job: ClaimedJob, taskID: String, outcome: String, exitStatus: Int32?, detail: String?)
        async throws
    {
        _ = try await client.transaction { tx in
            _ = try tx.query(
                """
                UPDATE tandem_tasks SET finished_at = now(), outcome = $3, exit_status = $4, updated_at = now()
                 WHERE task_id = $1 AND token = $2
                """, [.text(taskID), .int(job.token), .text(outcome), exitStatus.map { .int(Int64($0)) } ?? .null])
            _ = try tx.query(
                "INSERT INTO tandem_task_events (task_id, job_id, event, datacenter, token, detail) VALUES ($1, $2, $3, $4, $5, $6)",
                [
                    .text(taskID), .text(job.jobID), .text(outcome.lowercased()), .text(job.datacenter), .int(job.token),
                    detail.map { .text($0) } ?? .null,
                ])
        }
    }

    public func event(
        taskID: String, jobID: String, event: String, worker: String?, datacenter: String?, token: Int64?,
        detail: String?
    ) async throws {
        _ = try await client.query(
            "INSERT INTO tandem_task_events (task_id, job_id, event, worker, datacenter, token, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                .text(taskID), .text(jobID), .text(event), worker.map { .text($0) } ?? .null,
                datacenter.map { .text($0) } ?? .null, token.map { .int($0) } ?? .null, detail.map { .text($0) } ?? .null,
            ])
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
