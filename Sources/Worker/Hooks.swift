import Foundation
import Synchronization

/// What a worker reports as it works, for metrics. Every method has a no-op default, so an observer implements
/// only what it records. Called from the runtime's tasks: implementations must be cheap and thread-safe.
public protocol WorkerObserver: Sendable {
    /// `count` jobs were claimed in one round trip.
    func claimed(count: Int, datacenter: String)
    /// A task ended and its result was recorded (outcome: SUCCESS, FAILURE, REVOKED).
    /// `queueWaitSeconds` is dispatch → claim on Redis's clock; `runSeconds` is the process's run time.
    func taskFinished(queue: String, datacenter: String, outcome: String, runSeconds: Double, queueWaitSeconds: Double)
    /// One renewal pass: how many leases were extended and how many refused (reclaimed elsewhere).
    func leaseRenewals(renewed: Int, refused: Int)
    /// A write or ack of this worker was refused for a stale token.
    func fenced(queue: String, datacenter: String)
    /// A message was dead-lettered (never run).
    func deadLettered(queue: String, datacenter: String)
    /// A round trip to Redis succeeded (heartbeat, claim): readiness can recover without waiting for work.
    func brokerOK()
    /// Redis (broker) or Postgres (store) failed an operation.
    func brokerError()
    func storeError()
    /// Busy slots changed.
    func slotsBusy(_ busy: Int, of total: Int)
    /// How long the worker loop has left a probe waiting (0 while it keeps up; see `WorkerLoop.probe`).
    func loopStalled(seconds: Double)
    /// Jobs claimed ahead waited past the hold limit for a slot and went back to the front of their queue.
    func claimedAheadGivenBack(count: Int)
}

extension WorkerObserver {
    public func claimed(count: Int, datacenter: String) {}
    public func taskFinished(queue: String, datacenter: String, outcome: String, runSeconds: Double, queueWaitSeconds: Double) {}
    public func leaseRenewals(renewed: Int, refused: Int) {}
    public func fenced(queue: String, datacenter: String) {}
    public func deadLettered(queue: String, datacenter: String) {}
    public func brokerOK() {}
    public func brokerError() {}
    public func storeError() {}
    public func slotsBusy(_ busy: Int, of total: Int) {}
    public func loopStalled(seconds: Double) {}
    public func claimedAheadGivenBack(count: Int) {}
}

/// An observer that records nothing.
public struct NoWorkerObserver: WorkerObserver {
    public init() {}
}

/// Where a worker learns which tasks were revoked (Celery's `app.control.revoke`), including revokes broadcast
/// while it was not listening.
public protocol RevocationSource: Sendable {
    /// True when `taskID` was revoked and must not start.
    func isRevoked(_ taskID: String) async -> Bool
    /// True when this worker has heard of a revoke of `taskID` itself (a broadcast), without asking anyone.
    func isRevokedLocally(_ taskID: String) -> Bool
}

extension RevocationSource {
    public func isRevokedLocally(_ taskID: String) -> Bool { false }
}

/// No revocations (tests, or a worker started without pidbox support).
public struct NoRevocations: RevocationSource {
    public init() {}
    public func isRevoked(_ taskID: String) async -> Bool { false }
}

/// A write that starts after a delay unless called off first — the start of an attempt, which a quick task
/// writes together with its end instead.
final class DeferredWrite: Sendable {
    /// Writing carries the task that writes, so whoever calls the write off too late can wait for it.
    private enum Phase { case pending, writing(Task<Void, Never>), calledOff }
    private let phase = Mutex(Phase.pending)
    private let write: @Sendable () async -> Void
    fileprivate let due: ContinuousClock.Instant

    /// A write that starts now.
    convenience init(now write: @escaping @Sendable () async -> Void) {
        self.init(due: .now, write)
        start()
    }

    fileprivate init(due: ContinuousClock.Instant, _ write: @escaping @Sendable () async -> Void) {
        self.due = due
        self.write = write
    }

    /// Starts the write unless it was called off or has started.
    fileprivate func start() {
        phase.withLock { p in
            guard case .pending = p else { return }
            // on the worker loop, with the rest of the job's path (its Postgres reply resumes there)
            p = .writing(Task(executorPreference: WorkerLoop.shared) { [write] in await write() })
        }
    }

    fileprivate var isPending: Bool { phase.withLock { if case .pending = $0 { true } else { false } } }

    /// Calls the write off if it has not begun (true: the caller must write it), else waits for it (false).
    func cancelUnlessStarted() async -> Bool {
        let started = phase.withLock { p -> Task<Void, Never>? in
            switch p {
            case .pending:
                p = .calledOff
                return nil
            case .writing(let t): return t
            case .calledOff: return nil
            }
        }
        guard let started else { return true }
        await started.value
        return false
    }
}

/// Starts deferred writes when they fall due, from one timer loop for the whole worker. A sleeping task per
/// write, as before, cost each task a timer armed and disarmed on libdispatch's manager thread and two extra
/// pool wake-ups when the quick task called it off; here calling off is a flag, and the loop wakes only when the
/// earliest pending write falls due (or when one is added to an empty schedule).
final class DeferredWrites: Sendable {
    private let pending = Mutex<[DeferredWrite]>([])
    private let wake: AsyncStream<Void>
    private let wakeUp: AsyncStream<Void>.Continuation

    init() {
        (wake, wakeUp) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// A write that starts after `delay` unless called off first (`run()` must be running).
    func schedule(after delay: Duration, _ write: @escaping @Sendable () async -> Void) -> DeferredWrite {
        let w = DeferredWrite(due: .now + delay, write)
        let wasEmpty = pending.withLock { p -> Bool in
            p.append(w)
            return p.count == 1
        }
        // the loop sleeps without a deadline only while nothing is pending
        if wasEmpty { wakeUp.yield() }
        return w
    }

    /// Runs until cancelled: starts each pending write when it falls due; forgets those called off.
    func run() async {
        var woken = wake.makeAsyncIterator()
        while !Task.isCancelled {
            let now = ContinuousClock.now
            let (due, next) = pending.withLock { p -> ([DeferredWrite], ContinuousClock.Instant?) in
                // one pass: forget the called-off ones, take those that fell due
                var due: [DeferredWrite] = []
                p.removeAll { w in
                    guard w.isPending else { return true }
                    if w.due <= now { due.append(w) }
                    return w.due <= now
                }
                return (due, p.map(\.due).min())
            }
            for w in due { w.start() }
            if let next {
                try? await Task.sleep(until: next, clock: .continuous)
            } else {
                _ = await woken.next()
            }
        }
    }
}
