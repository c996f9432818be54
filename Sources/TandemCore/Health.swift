import Foundation
/// Datacenter health: which datacenters take new work, derived from worker heartbeats (on Redis's clock) and
/// operator overrides. Pure: the inputs are read from the broker by the caller.
public struct DatacenterState: Sendable, Hashable {
    public enum Status: String, Sendable {
        /// Heartbeating workers and no override: takes new work.
        case alive
        /// Operator maintenance: no new work; running work finishes; queued work stays until restore.
        case draining
        /// No heartbeat for longer than the loss threshold, or declared lost by an operator: its queued work
        /// moves to survivors and its leases are reclaimed as they expire.
        case lost
    }
    public var name: String
    public var status: Status
    /// Why it has that status, for `executorctl dc status`.
    public var reason: String
    public var liveWorkers: Int
    public var slots: Int
    public var busy: Int
    /// Most recent heartbeat of any of its workers (Redis ms), 0 if none.
    public var lastHeartbeatMs: Int64

    public var acceptsWork: Bool { status == .alive }
}

/// An operator's override for one datacenter (`executorctl dc drain|fail|restore`).
public enum DatacenterOverride: String, Sendable {
    case drain, fail
}

public enum DatacenterHealth {
    /// How often every worker heartbeats (`WorkerConfiguration.heartbeatInterval`).
    public static let heartbeatInterval: Duration = .seconds(2)
    /// The shortest loss threshold the dispatcher accepts: one and a half beats. At one beat or less a live
    /// datacenter looks lost for a moment before each heartbeat, and its queued work would move away.
    public static let shortestLossAfter: Duration = heartbeatInterval * 3 / 2

    /// Why `seconds` (a `--dc-loss-after` value) cannot be a loss threshold, or nil when it can: the dispatcher
    /// refuses to start with it, and executorctl refuses to show datacenters judged by it (live ones would show as
    /// lost between two beats).
    public static func lossAfterProblem(_ seconds: Double) -> String? {
        guard seconds.isFinite else { return "--dc-loss-after takes a number of seconds (\(seconds) given)" }
        guard Duration.milliseconds(Int64(seconds * 1000)) >= shortestLossAfter else {
            return "--dc-loss-after \(String(format: "%g", seconds)) is too short: workers heartbeat every "
                + "\(String(format: "%g", heartbeatInterval.inSeconds)) s, so a live datacenter would look lost between two beats "
                + "(and a dispatcher would move its queued work away). "
                + "Use at least \(String(format: "%g", shortestLossAfter.inSeconds)) (the default 15 also rides out a stalled worker or a slow Redis)."
        }
        return nil
    }

    /// Computes each datacenter's state.
    /// - Parameters:
    ///   - known: datacenters named anywhere (policy, queues, overrides) so a silent one still shows as lost.
    ///   - workers: the last heartbeat of every worker.
    ///   - overrides: operator overrides by datacenter.
    ///   - nowMs: Redis time.
    ///   - lossAfterMs: silence after which a datacenter is lost.
    public static func evaluate(
        known: Set<String>, workers: [WorkerStatus], overrides: [String: DatacenterOverride], nowMs: Int64,
        lossAfterMs: Int64
    ) -> [DatacenterState] {
        var names = known
        for w in workers { names.insert(w.datacenter) }
        for k in overrides.keys { names.insert(k) }
        return names.sorted().map { dc in
            let mine = workers.filter { $0.datacenter == dc }
            let live = mine.filter { nowMs - $0.lastSeenMs <= lossAfterMs && $0.state != .stopped }
            let last = mine.map(\.lastSeenMs).max() ?? 0
            var state = DatacenterState(
                name: dc, status: .alive, reason: "\(live.count) worker(s) heartbeating", liveWorkers: live.count,
                slots: live.filter { $0.state == .running }.map(\.slots).reduce(0, +),
                busy: live.map(\.busy).reduce(0, +), lastHeartbeatMs: last)
            switch overrides[dc] {
            case .fail?:
                state.status = .lost
                state.reason = "declared lost by an operator (executorctl dc restore \(dc) to undo)"
            case .drain?:
                state.status = .draining
                state.reason = "draining for maintenance (executorctl dc restore \(dc) to undo)"
            case nil:
                if live.isEmpty {
                    state.status = .lost
                    state.reason = last == 0
                        ? "no worker has ever heartbeated"
                        : "no heartbeat for \((nowMs - last) / 1000) s (loss threshold \(lossAfterMs / 1000) s)"
                } else if live.allSatisfy({ $0.state == .draining }) {
                    state.status = .draining
                    state.reason = "all workers are draining (shutting down, or drained with executorctl worker drain)"
                }
            }
            return state
        }
    }
}
