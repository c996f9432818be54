/// The broker seam. Tandem's runtimes talk to this protocol; `TandemRedis.RedisBroker` is the production
/// implementation. Every method is one atomic step on the broker (invariant 1 of DESIGN.md).
public protocol Broker: Sendable {
    /// Moves up to `max` messages of Airflow queue `queue` from the ingress lists into datacenter `datacenter`'s
    /// queue. `epoch` is the dispatcher's leadership epoch (nil when leadership is not in force); a stale
    /// epoch throws. Returns how many moved.
    func dispatch(queue: String, to datacenter: String, max: Int, epoch: Int64?) async throws -> Int

    /// Claims up to `max` jobs from `datacenter`'s queues (tried in the given order) for `workerID`, recording a
    /// lease of `leaseMs` in the same step. The broker counts the jobs each worker process claims and records
    /// `slots.released`, so the dispatcher knows how many slots are busy now, not as of the last heartbeat.
    /// `max` 0 only reports the released slots (a worker idle-waiting for work whose task just ended).
    func claim(workerID: String, datacenter: String, queues: [String], max: Int, leaseMs: Int64, slots: SlotReport)
        async throws -> [ClaimedJob]

    /// Renews leases; returns, per job, whether the lease is still ours.
    func renew(workerID: String, jobs: [(jobID: String, token: Int64)], leaseMs: Int64) async throws -> [Bool]

    /// Finishes a job (token-checked).
    func ack(jobID: String, token: Int64) async throws -> FencedOutcome

    /// Whether the job is still on the broker (queued, leased or dead-lettered; an acked job is gone). An ack retried
    /// after its reply was lost is refused — the job is gone — although the first one landed; this tells the two
    /// apart from a lease that another claim holds now.
    func jobExists(jobID: String) async throws -> Bool

    /// Puts a claimed job back at the front of its queue (token-checked).
    func requeue(jobID: String, token: Int64, refundAttempt: Bool) async throws -> FencedOutcome

    /// Parks a claimed job in the dead-letter queue with a reason (token-checked).
    func deadLetter(jobID: String, token: Int64, reason: String) async throws -> FencedOutcome

    /// Reclaims up to `limit` expired leases; jobs claimed `maxAttempts` times go to the dead-letter queue.
    func reclaimExpired(maxAttempts: Int, limit: Int) async throws -> [ReclaimedJob]

    /// Moves queued jobs of `queue` from one datacenter to another (drain after loss). Returns how many moved.
    func rebalance(queue: String, from: String, to: String, max: Int, epoch: Int64?) async throws -> Int

    /// Records a worker heartbeat; returns the broker's clock in ms.
    func heartbeat(_ status: WorkerStatus, ttlSeconds: Int) async throws -> Int64
    /// Whether an operator asked this worker to drain (claim nothing new, stay up).
    func drainRequested(workerID: String) async throws -> Bool

    /// Waits until work may be available for `datacenter` or `timeout` passes (whichever is first).
    func waitForWork(datacenter: String, timeout: Duration) async throws

    /// The broker's clock (ms).
    func now() async throws -> Int64
}

/// What a worker process says about its slots with every claim: which process it is (a restarted worker under the
/// same id starts counting again) and how many of the jobs it claimed have freed their slot.
public struct SlotReport: Sendable, Hashable {
    public var incarnation: String
    public var released: Int
    /// Names the claim so that it can be retried after its reply was lost: the same id again answers the jobs the
    /// first attempt took instead of taking more (nil: a claim that is not retried).
    public var claimID: String?
    public init(incarnation: String, released: Int, claimID: String? = nil) {
        self.incarnation = incarnation
        self.released = released
        self.claimID = claimID
    }
}

extension Broker {
    /// A claim by a caller that keeps no slot count (tests, tools): counted as a process of its own.
    public func claim(workerID: String, datacenter: String, queues: [String], max: Int, leaseMs: Int64) async throws
        -> [ClaimedJob]
    {
        try await claim(
            workerID: workerID, datacenter: datacenter, queues: queues, max: max, leaseMs: leaseMs,
            slots: SlotReport(incarnation: "untracked", released: 0))
    }
}
