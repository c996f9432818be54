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
        let (s, atto) = components
        if atto == 0 { return "\(s)s" }
        let ms = s * 1000 + atto / 1_000_000_000_000_000
        return "\(ms)ms"
    }
}

/// Connections opened by this process, for metrics: more than one per client means it reconnected.
public enum ConnectionStats {
    public static let redisConnects = Locked(0)
    public static let postgresConnects = Locked(0)
}
