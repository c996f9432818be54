import Foundation

// What the two C-backed clients (Redis, Postgres) and the test support share: a lock box, reconnect backoff
// and Duration conversions. Pure Swift; no C module.

/// A value guarded by a lock.
public final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }

    public var current: Value { withLock { $0 } }
}

/// Exponential reconnect backoff: 50 ms doubling to a 2 s cap, each delay jittered down by up to half.
public struct Backoff: Sendable {
    public init() {}
    public static let initial: Duration = .milliseconds(50)
    public static let cap: Duration = .seconds(2)
    private var next: Duration = Backoff.initial
    /// When the next connection attempt may start; nil when the last one succeeded.
    public private(set) var notBefore: ContinuousClock.Instant?

    public mutating func failed() {
        let jitter = Double.random(in: 0.5...1.0)
        let delay = next * jitter
        notBefore = .now + delay
        next = min(next * 2, Backoff.cap)
    }

    public mutating func succeeded() {
        next = Backoff.initial
        notBefore = nil
    }

    /// Sleeps out what is left of the backoff, but never longer than `limit`.
    public func wait(limit: Duration) {
        guard let notBefore else { return }
        let remaining = notBefore - .now
        guard remaining > .zero else { return }
        let d = min(remaining, limit)
        let (s, atto) = d.components
        let micros = Int64(s) * 1_000_000 + atto / 1_000_000_000_000
        if micros > 0 { usleep(useconds_t(micros)) }
    }
}

extension Duration {
    public var timeval: timeval {
        let (s, atto) = components
        return Foundation.timeval(tv_sec: Int(s), tv_usec: Int(atto / 1_000_000_000_000))
    }

    public var shortDescription: String {
        components.attoseconds == 0 ? "\(components.seconds)s" : "\(wholeMilliseconds)ms"
    }

    /// Whole milliseconds, rounded down (TandemCore's `inMilliseconds`; ClientSupport sits below it).
    package var wholeMilliseconds: Int64 {
        let (s, atto) = components
        return s * 1000 + atto / 1_000_000_000_000_000
    }
}

/// Connections opened by this process, for metrics: more than one per client means it reconnected.
public enum ConnectionStats {
    public static let redisConnects = Locked(0)
    public static let postgresConnects = Locked(0)
}

/// Combines concurrent requests into batches, with no timer and no task of its own: a request that finds a lane
/// free sends at once, taking with it whatever is waiting; requests that arrive while every lane is busy wait,
/// and when a batch returns, the first of them is handed the lane and sends the next batch itself. So under
/// light load a request goes alone and at once, under heavy load up to `maxBatch` share one round trip, and no
/// request pays a wake-up of a helper task (the group commit and the ack batcher each cost one per batch when a
/// task of their own did the sending).
public final class Combiner<Item: Sendable, Outcome: Sendable>: Sendable {
    /// Sends one batch on `lane`; one result per item, in order.
    public typealias Send = (_ lane: Int, _ items: [Item]) async -> [Result<Outcome, any Error>]

    private enum Turn: Sendable {
        case done(Result<Outcome, any Error>)
        case lead(Int)
    }
    private struct Waiting {
        var item: Item
        var waiter: CheckedContinuation<Turn, Never>
    }
    private struct State {
        var pending: [Waiting] = []
        var idleLanes: [Int]
        /// When the batch now in flight on each busy lane was sent.
        var sentAt: [Int: ContinuousClock.Instant] = [:]

        /// An idle lane for a new batch — unless `joinYoungerThan` is set and a batch in flight was sent less
        /// than that long ago: then the request waits to ride the next batch on that lane instead.
        mutating func takeLane(joinYoungerThan: Duration?) -> Int? {
            if let young = joinYoungerThan, !sentAt.isEmpty {
                let now = ContinuousClock.now
                if sentAt.values.contains(where: { now - $0 < young }) { return nil }
            }
            guard let lane = idleLanes.popLast() else { return nil }
            sentAt[lane] = .now
            return lane
        }
    }
    private let state: Locked<State>
    private let maxBatch: Int
    private let spillAfter: Duration?

    /// - Parameters:
    ///   - lanes: batches in flight at once (one per connection).
    ///   - spillAfter: nil: a request takes any idle lane. Set: while a batch sent less than this long ago is in
    ///     flight, requests wait for its lane instead (fewer, larger batches: a Postgres commit each); only a
    ///     slower batch (a far or busy server) lets them open another lane.
    public init(lanes: Int, maxBatch: Int, spillAfter: Duration? = nil) {
        precondition(lanes > 0 && maxBatch > 0)
        state = Locked(State(idleLanes: Array((0..<lanes).reversed())))
        self.maxBatch = maxBatch
        self.spillAfter = spillAfter
    }

    /// Sends `item` in a batch and returns its result; `send` sends a batch if this request is the one to send it.
    public func submit(_ item: Item, send: Send) async throws -> Outcome {
        // Invariant: a request waits only while a lane is busy, and every lane that finishes a batch hands itself
        // to the first waiting request, so nobody waits with no batch in flight.
        let turn: Turn
        if let lane = state.withLock({ $0.takeLane(joinYoungerThan: spillAfter) }) {
            turn = .lead(lane)
        } else {
            turn = await withCheckedContinuation { (c: CheckedContinuation<Turn, Never>) in
                let lane = state.withLock { s -> Int? in
                    if let l = s.takeLane(joinYoungerThan: spillAfter) { return l }
                    s.pending.append(Waiting(item: item, waiter: c))
                    return nil
                }
                if let lane { c.resume(returning: .lead(lane)) }
            }
        }
        switch turn {
        case .done(let result): return try result.get()
        case .lead(let lane): return try await lead(lane: lane, own: item, send: send).get()
        }
    }

    private func lead(lane: Int, own: Item, send: Send) async -> Result<Outcome, any Error> {
        let others = state.withLock { s -> [Waiting] in
            let batch = Array(s.pending.prefix(maxBatch - 1))
            s.pending.removeFirst(batch.count)
            return batch
        }
        // a plain loop, not `map(\.item)`: in this unspecialized generic the key path was built at run time on
        // every batch (1.3% of a worker's samples at c=2)
        var items = [own]
        items.reserveCapacity(others.count + 1)
        for w in others { items.append(w.item) }
        var results = await send(lane, items)
        while results.count < others.count + 1 {
            results.append(.failure(CombinerError(message: "a batch returned fewer results than it was sent items")))
        }
        for (w, r) in zip(others, results.dropFirst()) { w.waiter.resume(returning: .done(r)) }
        // hand the lane on: the first request still waiting sends the next batch
        let next = state.withLock { s -> Waiting? in
            if s.pending.isEmpty {
                s.idleLanes.append(lane)
                s.sentAt[lane] = nil
                return nil
            }
            s.sentAt[lane] = .now
            return s.pending.removeFirst()
        }
        next?.waiter.resume(returning: .lead(lane))
        return results[0]
    }
}

public struct CombinerError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
