/// Work waiting in Airflow's list of a queue that nothing can take now, and why. Celery leaves such a message
/// in its list without a word (the task sits in "queued" until Airflow's `task_queued_timeout`); Tandem names it.
public struct StrandedQueue: Sendable, Hashable {
    public var queue: String
    /// Messages waiting in the queue's lists (staging, plain and priority siblings).
    public var waiting: Int
    /// What keeps them there, and what to do about it.
    public var reason: String

    public init(queue: String, waiting: Int, reason: String) {
        self.queue = queue
        self.waiting = waiting
        self.reason = reason
    }

    /// The queues among `waiting` whose messages cannot move now: no running worker in a datacenter that accepts
    /// work serves the queue, or the routing policy allows only datacenters whose workers cannot take it.
    /// Work that waits only for a free slot is not stranded: a backlog drains as slots free up.
    /// `policy` nil: judged by the workers alone (what `executorctl` can see without the dispatcher's policy).
    public static func find(
        waiting: [String: Int], workers: [WorkerStatus], live: Set<String>, policy: RoutingPolicy?
    ) -> [StrandedQueue] {
        var out: [StrandedQueue] = []
        for (queue, n) in waiting.sorted(by: { $0.key < $1.key }) where n > 0 {
            let takers = Self.takers(of: queue, workers: workers, live: live)
            let reason: String
            if takers.isEmpty {
                let elsewhere = Set(workers.filter { $0.queues.contains(queue) }.map(\.datacenter)).sorted()
                reason = elsewhere.isEmpty
                    ? "no live worker serves queue '\(queue)': start one with --queues \(queue) (TANDEM_QUEUES), or check the queue the tasks name in Airflow"
                    : "queue '\(queue)' is served only in \(elsewhere.joined(separator: ", ")), which takes no work now (lost, draining, or its workers are stopping): see executorctl dc status, or start a worker with --queues \(queue) in another datacenter"
            } else if let policy {
                let allowed = policy.eligibleDatacenters(for: queue, live: live)
                guard allowed.filter(takers.contains).isEmpty else { continue }
                reason = allowed.isEmpty
                    ? "the routing policy sends queue '\(queue)' \(policy.describe(queue: queue)), and none of those datacenters takes work now: see executorctl dc status"
                    : "the routing policy sends queue '\(queue)' to \(allowed.joined(separator: ", ")), where no live worker serves it (it is served in \(takers.sorted().joined(separator: ", "))): start a worker with --queues \(queue) there, or change the policy"
            } else {
                continue
            }
            out.append(StrandedQueue(queue: queue, waiting: n, reason: reason))
        }
        return out
    }

    /// The datacenters that can take `queue`'s work now: those with a running worker serving it, among the
    /// datacenters that accept work (`live`).
    public static func takers(of queue: String, workers: [WorkerStatus], live: Set<String>) -> Set<String> {
        Set(workers.filter { $0.state == .running && live.contains($0.datacenter) && $0.queues.contains(queue) }.map(\.datacenter))
    }
}

extension RoutingPolicy {
    /// Where the policy sends `queue`, in words ("only to east", "to east or west", "to any datacenter").
    public func describe(queue: String) -> String {
        switch rule(for: queue) {
        case .spread(nil): return "to any datacenter"
        case .spread(let dcs?): return "to " + dcs.joined(separator: " or ")
        case .pin(let dc, let fallback?): return "to \(dc) (falling back to \(fallback))"
        case .pin(let dc, nil): return "only to \(dc)"
        }
    }
}
