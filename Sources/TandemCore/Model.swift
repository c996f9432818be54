/// The domain vocabulary shared by every Tandem component: jobs, leases, workers and datacenters.
/// Pure value types; nothing here performs I/O.

/// A Celery message that Tandem has taken out of an ingress list, as a worker holds it after a claim.
public struct ClaimedJob: Sendable, Hashable {
    /// Tandem's job id (a Redis counter), the key of every lease and queue entry.
    public var jobID: String
    /// The fencing token of this claim. Tokens only grow; an ack or result write with an older one is refused.
    public var token: Int64
    /// How many times this job has been claimed, this claim included.
    public var attempts: Int
    /// The kombu list element exactly as the Celery client wrote it.
    public var raw: [UInt8]
    /// The kombu list it came from (the queue name, or a priority sibling such as `default\u{06}\u{16}3`).
    public var ingressList: String
    /// The Airflow queue (the ingress list without its priority suffix).
    public var queue: String
    /// The datacenter whose queue it was claimed from.
    public var datacenter: String
    /// When the dispatcher moved it out of the ingress list (Redis time, ms).
    public var dispatchedAtMs: Int64
    /// When the lease ends unless renewed (Redis time, ms).
    public var leaseDeadlineMs: Int64
    /// False when the broker knows no revoke was in force at the moment of the claim, so the worker can skip
    /// asking for this task's revoke (a round trip on every task's path). True when unknown.
    public var mayBeRevoked = true

    public init(
        jobID: String, token: Int64, attempts: Int, raw: [UInt8], ingressList: String, queue: String,
        datacenter: String, dispatchedAtMs: Int64, leaseDeadlineMs: Int64
    ) {
        self.jobID = jobID
        self.token = token
        self.attempts = attempts
        self.raw = raw
        self.ingressList = ingressList
        self.queue = queue
        self.datacenter = datacenter
        self.dispatchedAtMs = dispatchedAtMs
        self.leaseDeadlineMs = leaseDeadlineMs
    }
}

/// What happened to a lease-holder's request (ack, requeue, dead-letter, result write).
public enum FencedOutcome: Sendable, Hashable {
    /// The request was carried out.
    case done
    /// An ack carried out although the lease had expired: the job was back in its queue, not yet claimed again
    /// (a worker cut off past its lease whose task had finished). Its queued copy is removed, so it does not run
    /// a second time.
    case doneLate
    /// Refused: the lease was reclaimed and a newer claim (or nobody) holds the job now.
    case fenced
}

/// What a reclaim pass did with one expired lease.
public struct ReclaimedJob: Sendable, Hashable {
    public enum Disposition: String, Sendable { case requeued, dead }
    public var jobID: String
    public var disposition: Disposition
    public var attempts: Int
    public init(jobID: String, disposition: Disposition, attempts: Int) {
        self.jobID = jobID
        self.disposition = disposition
        self.attempts = attempts
    }
}

/// What a worker reports about itself on every heartbeat.
public struct WorkerStatus: Sendable, Hashable {
    public enum State: String, Sendable { case running, draining, stopped }
    public var workerID: String
    public var datacenter: String
    public var slots: Int
    public var busy: Int
    public var queues: [String]
    public var hostname: String
    public var pid: Int32
    /// Jobs with a started task (running, or ended with its result being recorded).
    public var runningJobs: [String]
    /// Jobs claimed ahead of a free slot (`--claim-ahead`): leased to this worker, not started yet.
    public var aheadJobs: [String]
    public var state: State
    /// Redis time of the last heartbeat (ms); filled in when read back.
    public var lastSeenMs: Int64
    /// Results and ledger writes waiting in the worker's local spool for Postgres (0 while Postgres answers).
    public var spooledWrites: Int = 0
    /// The worker's Tandem version ("" from workers before 0.17).
    public var version: String = TandemVersion.current

    public init(
        workerID: String, datacenter: String, slots: Int, busy: Int, queues: [String], hostname: String,
        pid: Int32, runningJobs: [String], aheadJobs: [String] = [], state: State, lastSeenMs: Int64 = 0
    ) {
        self.workerID = workerID
        self.datacenter = datacenter
        self.slots = slots
        self.busy = busy
        self.queues = queues
        self.hostname = hostname
        self.pid = pid
        self.runningJobs = runningJobs
        self.aheadJobs = aheadJobs
        self.state = state
        self.lastSeenMs = lastSeenMs
    }
}

/// Depth and age of one datacenter queue.
public struct QueueStats: Sendable, Hashable {
    public var datacenter: String
    public var queue: String
    public var depth: Int
    public var inFlight: Int
    /// Age of the oldest queued job in ms (0 when empty).
    public var oldestAgeMs: Int64
    public init(datacenter: String, queue: String, depth: Int, inFlight: Int, oldestAgeMs: Int64) {
        self.datacenter = datacenter
        self.queue = queue
        self.depth = depth
        self.inFlight = inFlight
        self.oldestAgeMs = oldestAgeMs
    }
}

/// Names must be usable inside Redis keys (`{tandem}:q:<dc>:<queue>`): no `:` in a datacenter name, no spaces.
public enum Names {
    /// Returns an error message a person can act on, or nil when `dc` is a valid datacenter name.
    public static func problem(datacenter dc: String) -> String? {
        if dc.isEmpty { return "datacenter name is empty: pass --dc NAME or set TANDEM_DC" }
        let ok = dc.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x5F
        }
        return ok ? nil : "datacenter name \"\(dc)\" may contain only letters, digits, '-' and '_'"
    }
}

extension Duration {
    /// Whole milliseconds (lease and heartbeat arithmetic is in Redis milliseconds).
    public var inMilliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }

    /// Fractional seconds (Redis blocking timeouts, run times).
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
