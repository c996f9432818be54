import TandemCore

/// What the dispatcher reports, for metrics. No-op defaults; implementations must be cheap and thread-safe.
public protocol DispatcherObserver: Sendable {
    func dispatched(queue: String, datacenter: String, count: Int)
    func reclaimed(requeued: Int, dead: Int)
    func rebalanced(queue: String, from: String, to: String, count: Int)
    /// Queued jobs moved from a datacenter whose slots were all busy to one with idle slots.
    func shared(queue: String, from: String, to: String, count: Int)
    /// Called after each health refresh with the datacenter states.
    func datacenters(_ states: [DatacenterState])
    /// Called periodically with every datacenter queue's depth and oldest age.
    func queues(_ stats: [QueueStats])
    /// Called periodically with what waits in Airflow's lists per queue, and which of it nothing can take.
    func ingress(waiting: [String: Int], stranded: [StrandedQueue])
    /// Called periodically with Redis's memory use and its maxmemory (0: none).
    func redisMemory(usedBytes: Int64, maxBytes: Int64)
    /// Called periodically with how many messages stock Celery workers reserved and never acked.
    func celeryReserved(count: Int)
    /// Leadership changed: this dispatcher leads with `epoch`, or (nil) is a standby.
    func leadership(epoch: Int64?)
    func brokerError()
    /// How long the dispatcher loop has left a probe waiting (about 0 while it keeps up; see `run(on:)`).
    func loopStalled(seconds: Double)
}

extension DispatcherObserver {
    public func dispatched(queue: String, datacenter: String, count: Int) {}
    public func reclaimed(requeued: Int, dead: Int) {}
    public func rebalanced(queue: String, from: String, to: String, count: Int) {}
    public func shared(queue: String, from: String, to: String, count: Int) {}
    public func datacenters(_ states: [DatacenterState]) {}
    public func queues(_ stats: [QueueStats]) {}
    public func ingress(waiting: [String: Int], stranded: [StrandedQueue]) {}
    public func redisMemory(usedBytes: Int64, maxBytes: Int64) {}
    public func celeryReserved(count: Int) {}
    public func leadership(epoch: Int64?) {}
    public func brokerError() {}
    public func loopStalled(seconds: Double) {}
}

public struct NoDispatcherObserver: DispatcherObserver {
    public init() {}
}
