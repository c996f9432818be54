import Postgres
import Synchronization

/// Group commit: writes from concurrently running tasks share one transaction (and one WAL flush) instead of one
/// commit each. No write waits for a timer — while one batch commits, the next accumulates, so under light load a
/// write commits alone at once and under heavy load up to `maxBatch` ride one commit.
final class GroupCommitter: Sendable {
    typealias Waiter = CheckedContinuation<StoreOutcome, any Error>

    private struct State {
        var pending: [(StoreOperation, Waiter)] = []
        var draining = false
    }

    private let client: PostgresClient
    private let maxBatch: Int
    private let state = Mutex(State())

    init(client: PostgresClient, maxBatch: Int = 256) {
        self.client = client
        self.maxBatch = maxBatch
    }

    func submit(_ op: StoreOperation) async throws -> StoreOutcome {
        try await withCheckedThrowingContinuation { (waiter: Waiter) in
            let start = state.withLock { s -> Bool in
                s.pending.append((op, waiter))
                if s.draining { return false }
                s.draining = true
                return true
            }
            if start { Task { await self.drain() } }
        }
    }

    private func drain() async {
        while true {
            let batch = state.withLock { s -> [(StoreOperation, Waiter)]? in
                if s.pending.isEmpty {
                    s.draining = false
                    return nil
                }
                let b = Array(s.pending.prefix(maxBatch))
                s.pending.removeFirst(b.count)
                return b
            }
            guard let batch else { return }
            let ops = batch.map(\.0)
            do {
                let outcomes = try await client.transaction { tx in try ops.map { try PostgresStore.apply($0, in: tx) } }
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
