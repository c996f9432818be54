import Foundation
import Logging
import Postgres
import Redis
import TandemRedis
import Testing
import TestSupport

/// A Postgres that answers but refuses writes: a server of its own, since the refusal is set server-wide
/// (`ALTER SYSTEM`, reloaded into every open session, the worker's too) and would fail every other test's writes.
@Suite("Worker against a Postgres refusing writes", .serialized)
struct PostgresRefusalTests {
    let cluster: Cluster
    let redis: RedisClient
    let pg: PostgresClient

    init() async throws {
        cluster = try Cluster(dedicatedPostgres: true)
        redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "t"))
    }

    @discardableResult
    func submit(task: String, run: String) async throws -> String {
        try await publishAirflowCommand(redis, task: task, run: run)
    }

    @Test("Postgres refusing writes though it answers (read-only, as a demoted primary is): results spool on disk, jobs are acked, no finished task runs again; flushed once writable")
    func readOnlyPostgresSpoolsInsteadOfRerunning() async throws {
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2", "--lease-ttl", "4", "--renew-every", "1"])
        _ = try await eventually(timeout: .seconds(30)) {
            (try? await pg.query("SELECT to_regclass('celery_taskmeta') IS NOT NULL AS ok"))?.rows.first?.string("ok") == "t"
        }
        // every session, the worker's open ones too (a reload applies to them), refuses writes with SQLSTATE 25006
        let admin = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "admin"))
        defer { admin.close() }
        _ = try await admin.query("ALTER SYSTEM SET default_transaction_read_only = on")
        _ = try await admin.query("SELECT pg_reload_conf()")
        var ids: [String] = []
        for i in 0..<6 { ids.append(try await submit(task: "ok", run: "ro\(i)")) }
        let ended = try await eventually(timeout: .seconds(60)) { cluster.taskEvents().filter { $0.event == "end" }.count == 6 }
        #expect(ended, "\(cluster.logs())")
        let spooled = try await eventually(timeout: .seconds(20)) {
            Int(try await redis.send(["HGET", Keys.worker("east-1"), "spooled"]).string ?? "") ?? 0 > 0
        }
        #expect(spooled, "the refused writes went to the spool: \(cluster.logs())")
        // longer than a lease: a job whose result could not be written is not reclaimed and run again
        try await Task.sleep(for: .seconds(6))
        #expect(cluster.taskEvents().filter { $0.event == "start" }.count == 6, "\(cluster.logs())")
        #expect(try await celeryStates(pg, ids).isEmpty)

        _ = try await admin.query("SET default_transaction_read_only = off")
        _ = try await admin.query("ALTER SYSTEM RESET default_transaction_read_only")
        _ = try await admin.query("SELECT pg_reload_conf()")
        let s = try await waitForCeleryFinal(pg, ids)
        #expect(ids.allSatisfy { s[$0] == "SUCCESS" }, "\(s)\n\(cluster.logs())")
        let starts = cluster.taskEvents().filter { $0.event == "start" }
        #expect(starts.count == 6 && Set(starts.map(\.key)).count == 6, "each task ran once: \(starts.count) starts")
    }
}
