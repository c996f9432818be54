import ClientSupport
import Foundation
import Postgres

/// Group commit: writes from concurrently running tasks share one transaction (and one WAL flush) instead of one
/// commit each. No write waits for a timer — while one batch commits, the next accumulates (`Combiner`), so under
/// light load a write commits alone at once and under heavy load up to `maxBatch` ride one commit. With several
/// connections, several batches commit at once once one is slow (`spillAfter`): far from Postgres, or behind a
/// lock, one connection would make every task wait behind every other. (One task's writes are awaited
/// one after the other, so they never race each other across connections.)
final class GroupCommitter: Sendable {
    private let clients: [PostgresClient]
    private let batches: Combiner<StoreOperation, StoreOutcome>

    /// A write waits for the batch in flight (and rides the next one on its connection) unless that batch has been
    /// out longer than this: on loopback a commit takes well under it, so at concurrency 2 commits per task fell
    /// from 1.1 to 0.5 (Postgres CPU per task -25%, Benchmarks/diag_switches.py) instead of each write taking its
    /// own connection; a slow commit (a far server, a lock) lets the next writes open another connection.
    static let spillAfter = Duration.milliseconds(
        Int64(ProcessInfo.processInfo.environment["TANDEM_GROUP_COMMIT_SPILL_MS"].flatMap(Int.init) ?? 5))

    init(clients: [PostgresClient], maxBatch: Int = 64) {
        precondition(!clients.isEmpty)
        self.clients = clients
        batches = Combiner(lanes: clients.count, maxBatch: maxBatch, spillAfter: Self.spillAfter)
    }

    func close() { for c in clients { c.close() } }

    /// Opens every connection now: a connection opened on first use costs the write that needed it a connect
    /// (tens of ms under load), which showed as paced-latency outliers. A failure here is left to first use.
    func connectAll() async {
        for c in clients { try? await c.connect() }
    }

    func submit(_ op: StoreOperation) async throws -> StoreOutcome {
        try await batches.submit(op) { lane, ops in await commit(ops, on: clients[lane]) }
    }

    /// Commits one batch; one outcome per write.
    private func commit(_ ops: [StoreOperation], on client: PostgresClient) async -> [Result<StoreOutcome, any Error>] {
        do {
            let plans = ops.compactMap(PostgresStore.pipelined)
            if plans.count == ops.count {
                // the hot path: every write is self-contained, so the batch goes in one round trip
                let results = try await client.pipeline(plans.flatMap(\.statements))
                return PostgresStore.outcomes(of: plans, from: results).map { .success($0) }
            }
            return try await client.transaction { tx in try ops.map { try PostgresStore.apply($0, in: tx) } }
                .map { .success($0) }
        } catch {
            // Postgres gone or not answering: every write of the batch fails the same way (and goes to the spool at
            // once); retried one by one, each would wait out its own connect or reply timeout first
            if ops.count == 1 || (error as? PostgresError)?.isOutage == true { return ops.map { _ in .failure(error) } }
            // one bad write must not fail its neighbours: retry each alone, so only it sees its error
            var out: [Result<StoreOutcome, any Error>] = []
            for op in ops {
                do {
                    out.append(.success(try await client.transaction { tx in try PostgresStore.apply(op, in: tx) }))
                } catch {
                    out.append(.failure(error))
                }
            }
            return out
        }
    }
}
