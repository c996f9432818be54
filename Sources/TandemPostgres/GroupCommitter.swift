import Postgres
import Synchronization

/// Group commit: writes from concurrently running tasks share one transaction (and one WAL flush) instead of one
/// commit each. No write waits for a timer — while one batch commits, the next accumulates, so under light load a
/// write commits alone at once and under heavy load up to `maxBatch` ride one commit. With several connections,
/// several batches commit at once: far from Postgres a transaction costs a round trip per statement, and one
/// connection would make every task wait behind every other. (One task's writes are awaited one after the
/// other, so they never race each other across connections.)
final class GroupCommitter: Sendable {
    typealias Waiter = CheckedContinuation<StoreOutcome, any Error>

    private struct State {
        var pending: [(StoreOperation, Waiter)] = []
        /// Connections not draining right now.
        var idle: [Int]
    }

    private let clients: [PostgresClient]
    private let maxBatch: Int
    private let state: Mutex<State>

    init(clients: [PostgresClient], maxBatch: Int = 64) {
        precondition(!clients.isEmpty)
        self.clients = clients
        self.maxBatch = maxBatch
        state = Mutex(State(idle: Array(clients.indices)))
    }

    func close() { for c in clients { c.close() } }

    /// Opens every connection now: a connection opened on first use costs the write that needed it a connect
    /// (tens of ms under load), which showed as paced-latency outliers. A failure here is left to first use.
    func connectAll() async {
        for c in clients { try? await c.connect() }
    }

    func submit(_ op: StoreOperation) async throws -> StoreOutcome {
        try await withCheckedThrowingContinuation { (waiter: Waiter) in
            let start = state.withLock { s -> Int? in
                s.pending.append((op, waiter))
                return s.idle.popLast()
            }
            if let start { Task { await self.drain(self.clients[start], index: start) } }
        }
    }

    private func drain(_ client: PostgresClient, index: Int) async {
        while true {
            let batch = state.withLock { s -> [(StoreOperation, Waiter)]? in
                if s.pending.isEmpty {
                    s.idle.append(index)
                    return nil
                }
                let b = Array(s.pending.prefix(maxBatch))
                s.pending.removeFirst(b.count)
                return b
            }
            guard let batch else { return }
            let ops = batch.map(\.0)
            do {
                let outcomes: [StoreOutcome]
                let plans = ops.compactMap(PostgresStore.pipelined)
                if plans.count == ops.count {
                    // the hot path: every write is self-contained, so the batch goes in one round trip
                    let results = try await client.pipeline(plans.flatMap(\.statements))
                    outcomes = PostgresStore.outcomes(of: plans, from: results)
                } else {
                    outcomes = try await client.transaction { tx in try ops.map { try PostgresStore.apply($0, in: tx) } }
                }
                for (w, o) in zip(batch.map(\.1), outcomes) { w.resume(returning: o) }
            } catch {
                if batch.count == 1 {
                    batch[0].1.resume(throwing: error)
                    continue
                }
                // one bad write must not fail its neighbours: retry each alone, so only it sees its error
                for (op, w) in batch {
                    do {
                        w.resume(returning: try await client.transaction { tx in try PostgresStore.apply(op, in: tx) })
                    } catch {
                        w.resume(throwing: error)
                    }
                }
            }
        }
    }
}
