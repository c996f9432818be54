import CeleryWire

/// Identifies the lease a write is made under. A store that can check it refuses writers whose lease was
/// reclaimed (DESIGN.md invariant 2).
public struct Fence: Sendable, Hashable {
    public var jobID: String
    public var token: Int64
    public init(jobID: String, token: Int64) {
        self.jobID = jobID
        self.token = token
    }
}

/// The result of writing a Celery result record.
public enum ResultWriteOutcome: Sendable, Hashable {
    case written
    /// A SUCCESS was already stored; Tandem never overwrites one.
    case keptSuccess
    /// The writer's lease is no longer current; nothing was written.
    case fenced
}

/// Where Celery result records go: what Airflow's `BulkStateFetcher` reads.
public protocol ResultBackend: Sendable {
    func store(_ record: ResultRecord, fence: Fence?) async throws -> ResultWriteOutcome
    /// Reads the current state of a task (PENDING when there is no record), as Celery's reader would.
    func state(taskID: String) async throws -> CeleryState
    /// True when a refused (fenced) write is already recorded in the ledger by the backend itself.
    var recordsFencingInLedger: Bool { get }
}

extension ResultBackend {
    public var recordsFencingInLedger: Bool { false }
}

/// Facts about a task the ledger keeps alongside the lease.
public struct TaskFacts: Sendable, Hashable {
    public var taskID: String
    public var taskName: String
    public var kind: String
    public var workerID: String
    public var hostname: String
    public init(taskID: String, taskName: String, kind: String, workerID: String, hostname: String) {
        self.taskID = taskID
        self.taskName = taskName
        self.kind = kind
        self.workerID = workerID
        self.hostname = hostname
    }
}

/// One row of the ledger: a task's history as Tandem saw it.
public struct LedgerEntry: Sendable, Hashable {
    public var taskID: String
    public var jobID: String
    public var taskName: String
    public var ingressQueue: String
    public var datacenter: String
    public var dispatchedAt: String?
    public var claimedBy: String?
    public var token: Int64
    public var attempts: Int
    public var startedAt: String?
    public var finishedAt: String?
    public var outcome: String?
    public var exitStatus: Int?
    public var events: [LedgerEvent]
    public init(
        taskID: String, jobID: String, taskName: String, ingressQueue: String, datacenter: String,
        dispatchedAt: String?, claimedBy: String?, token: Int64, attempts: Int, startedAt: String?,
        finishedAt: String?, outcome: String?, exitStatus: Int?, events: [LedgerEvent]
    ) {
        self.taskID = taskID
        self.jobID = jobID
        self.taskName = taskName
        self.ingressQueue = ingressQueue
        self.datacenter = datacenter
        self.dispatchedAt = dispatchedAt
        self.claimedBy = claimedBy
        self.token = token
        self.attempts = attempts
        self.startedAt = startedAt
        self.finishedAt = finishedAt
        self.outcome = outcome
        self.exitStatus = exitStatus
        self.events = events
    }
}

public struct LedgerEvent: Sendable, Hashable {
    public var at: String
    public var event: String
    public var worker: String?
    public var datacenter: String?
    public var token: Int64?
    public var detail: String?
    public init(at: String, event: String, worker: String?, datacenter: String?, token: Int64?, detail: String?) {
        self.at = at
        self.event = event
        self.worker = worker
        self.datacenter = datacenter
        self.token = token
        self.detail = detail
    }
}

/// Tandem's own history of every task: which datacenter, which worker, how many attempts, what came of it.
/// The ledger also carries the Postgres side of fencing: a claim records its token only if no newer one is
/// there, and a result write checks it.
public protocol TaskLedger: Sendable {
    /// Records a claim. `.fenced` when a newer claim of the same task is already recorded.
    func claimed(_ job: ClaimedJob, facts: TaskFacts) async throws -> FencedOutcome
    func started(_ job: ClaimedJob, taskID: String, pid: Int32) async throws
    /// Records the end of an attempt (outcome is a Celery state or "fenced", "requeued", "dead").
    func finished(_ job: ClaimedJob, taskID: String, outcome: String, exitStatus: Int32?, detail: String?) async throws
    /// Records an event without changing the current token (a fenced late attempt, a dead letter).
    func event(taskID: String, jobID: String, event: String, worker: String?, datacenter: String?, token: Int64?,
        detail: String?) async throws
    func entry(taskID: String) async throws -> LedgerEntry?
    /// Writes (results, ledger events) waiting on this host for the store to be reachable again: the worker's
    /// spool while Postgres is down. Shown in `executorctl workers` and exported as a metric.
    var writesWaitingLocally: Int { get }
}

extension TaskLedger {
    public var writesWaitingLocally: Int { 0 }
}

/// A store that can record the start of an attempt — the claim, the ledger's start and Celery's STARTED — in one
/// write (one commit on the task's path instead of two). `.fenced`: a newer claim of the task is on record.
public protocol AttemptStartRecorder: Sendable {
    func began(_ job: ClaimedJob, facts: TaskFacts, pid: Int32, started: ResultRecord) async throws -> FencedOutcome
    /// The end of an attempt in one write: Celery's final state (token-checked, as `store(_:fence:)`) and the
    /// ledger's end of attempt (as `finished`).
    func ended(_ job: ClaimedJob, result: ResultRecord, outcome: String, exitStatus: Int32?, detail: String?)
        async throws -> ResultWriteOutcome
    /// `began` and `ended` together, in one transaction: the start of an attempt that ended before it was written.
    func ranAndEnded(
        _ job: ClaimedJob, facts: TaskFacts, pid: Int32, started: ResultRecord, result: ResultRecord, outcome: String,
        exitStatus: Int32?, detail: String?
    ) async throws -> ResultWriteOutcome
}
