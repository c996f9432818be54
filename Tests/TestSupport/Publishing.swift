import CeleryWire
import Foundation
import Postgres
import Redis

/// Publishes `airflow tasks run DAG TASK RUN --local` the way Airflow 2's stock CeleryExecutor does (kombu's binding
/// SADD, then its LPUSH of an `execute_command` message onto the queue's list); returns the new task id. With `retrying`, each LPUSH is
/// retried until the broker acknowledges it, as a publisher does through a failover.
@discardableResult
public func publishAirflowCommand(
    _ redis: RedisClient, dag: String = "dag", task: String, run: String, queue: String = "default",
    soft: Double? = nil, hard: Double? = nil, retrying: Bool = false
) async throws -> String {
    let id = UUID().uuidString.lowercased()
    let m = CeleryPublisher.message(
        taskName: "execute_command", id: id,
        args: [.array(["airflow", "tasks", "run", .string(dag), .string(task), .string(run), "--local"])],
        queue: queue, timeLimit: (hard: hard, soft: soft))
    while true {
        do {
            // kombu declares the queue's binding on every publish (what the dispatcher finds queues by), then LPUSHes
            _ = try await redis.send(["SADD", CeleryPublisher.bindingKey(queue: queue), CeleryPublisher.bindingMember(queue: queue)])
            _ = try await redis.send(["LPUSH", m.list, m.element])
            return id
        } catch {
            // (a catch-where on this typed-throws call crashed swift-frontend 6.3.1's SILGen)
            if !retrying { throw error }
            try await Task.sleep(for: .milliseconds(100))
        }
    }
}

/// celery_taskmeta's status by task id, for `ids` (absent: not written yet; empty before the table exists).
public func celeryStates(_ pg: PostgresClient, _ ids: [String]) async throws -> [String: String] {
    guard (try await pg.query("SELECT to_regclass('celery_taskmeta') IS NOT NULL AS ok")).rows.first?.string("ok") == "t"
    else { return [:] }
    let r = try await pg.query("SELECT task_id, status FROM celery_taskmeta")
    var out: [String: String] = [:]
    for row in r.rows { if let id = row.string("task_id"), ids.contains(id) { out[id] = row.string("status") } }
    return out
}

/// Waits until every one of `ids` has a final state (SUCCESS or FAILURE) in celery_taskmeta; returns the states.
public func waitForCeleryFinal(_ pg: PostgresClient, _ ids: [String], timeout: Duration = .seconds(90)) async throws -> [String: String] {
    _ = try await eventually(timeout: timeout) {
        let s = try await celeryStates(pg, ids)
        return ids.allSatisfy { ["SUCCESS", "FAILURE"].contains(s[$0] ?? "") }
    }
    return try await celeryStates(pg, ids)
}
