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
    private enum Phase { case pending, writing, calledOff }
    private let phase = Mutex(Phase.pending)
    private let task = Mutex<Task<Void, Never>?>(nil)

    init(after delay: Duration, _ write: @escaping @Sendable () async -> Void) {
        let t = Task { [self] in
            if delay > .zero { try? await Task.sleep(for: delay) }
            if begin() { await write() }
        }
        task.withLock { $0 = t }
    }

    private func begin() -> Bool {
        phase.withLock { p -> Bool in
            guard p == .pending else { return false }
            p = .writing
            return true
        }
    }

    /// Calls the write off if it has not begun (true: the caller must write it), else waits for it (false).
    func cancelUnlessStarted() async -> Bool {
        let calledOff = phase.withLock { p -> Bool in
            guard p == .pending else { return false }
            p = .calledOff
            return true
        }
        let t = task.withLock { $0 }
        if calledOff {
            t?.cancel()
            return true
        }
        await t?.value
        return false
    }
}
