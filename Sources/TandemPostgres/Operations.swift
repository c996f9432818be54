import CeleryWire
import Foundation
import TandemCore

/// One write to Postgres, in a form the spool can store on disk and replay later.
public indirect enum StoreOperation: Codable, Sendable, Hashable {
    case result(ResultWrite)
    case claimed(Claim)
    case started(Start)
    case finished(Finish)
    case event(Event)
    /// Several operations in one transaction, in order; stops after the first that is refused (fenced). Its outcome
    /// is the last operation's.
    case sequence([StoreOperation])
    /// `.sequence([.claimed, .started, .result(STARTED)])` as one statement (what a worker writes per start).
    case began(Claim, pid: Int32, started: ResultWrite)
    /// `.result` (token-checked) and `.finished` of the same attempt as one statement (what a worker writes per end).
    case completed(ResultWrite, Finish)

    public var taskID: String {
        switch self {
        case .result(let r): return r.taskID
        case .claimed(let c): return c.taskID
        case .started(let s): return s.taskID
        case .finished(let f): return f.taskID
        case .event(let e): return e.taskID
        case .sequence(let ops): return ops.first?.taskID ?? ""
        case .began(let c, _, _): return c.taskID
        case .completed(let r, _): return r.taskID
        }
    }

    /// A Celery result row, token-checked against the ledger when `fenceToken` is set.
    public struct ResultWrite: Codable, Sendable, Hashable {
        public var taskID: String
        public var state: String
        public var result: [UInt8]?
        public var traceback: String?
        /// ISO-8601 with offset; nil means "now" at the time of writing.
        public var dateDone: String?
        public var fenceJob: String?
        public var fenceToken: Int64?

        public init(_ r: ResultRecord, fence: Fence?) {
            taskID = r.taskId
            state = r.state.rawValue
            result = r.databaseResult()
            traceback = r.traceback
            dateDone = r.dateDone.map(CeleryDate.isoformat)  // microseconds, as Celery writes date_done
            fenceJob = fence?.jobID
            fenceToken = fence?.token
        }
    }

    public struct Claim: Codable, Sendable, Hashable {
        public var taskID, jobID, taskName, kind, ingressList, queue, datacenter, workerID, hostname: String
        public var dispatchedAtMs, token: Int64
        public var attempts: Int

        public init(_ job: ClaimedJob, _ facts: TaskFacts) {
            taskID = facts.taskID
            jobID = job.jobID
            taskName = facts.taskName
            kind = facts.kind
            ingressList = job.ingressList
            queue = job.queue
            datacenter = job.datacenter
            workerID = facts.workerID
            hostname = facts.hostname
            dispatchedAtMs = job.dispatchedAtMs
            token = job.token
            attempts = job.attempts
        }
    }

    public struct Start: Codable, Sendable, Hashable {
        public var taskID, jobID, datacenter: String
        public var token: Int64
        public var pid: Int32
    }

    public struct Finish: Codable, Sendable, Hashable {
        public var taskID, jobID, datacenter: String
        public var token: Int64
        public var outcome: String
        public var exitStatus: Int32?
        public var detail: String?
    }

    public struct Event: Codable, Sendable, Hashable {
        public var taskID, jobID, event: String
        public var worker, datacenter: String?
        public var token: Int64?
        public var detail: String?
    }
}

/// What applying an operation did.
public enum StoreOutcome: Sendable, Hashable {
    case done, written, keptSuccess, fenced
    /// Postgres was unreachable: the operation is on the local spool and will be applied in order later.
    case spooled

    var resultOutcome: ResultWriteOutcome {
        switch self {
        case .fenced: return .fenced
        case .keptSuccess: return .keptSuccess
        default: return .written
        }
    }
}

/// A store whose every write is a `StoreOperation`: it gets Celery's result writes and the ledger's writes from
/// this one method. (`PostgresStore` applies them with group commit; `SpoolingStore` spools them while Postgres is
/// unreachable.)
public protocol StoreOperationSink: ResultBackend, TaskLedger, AttemptStartRecorder {
    func perform(_ op: StoreOperation) async throws -> StoreOutcome
}

extension StoreOperationSink {
    /// The start of an attempt in one write: the claim (token-checked), the ledger's start and Celery's STARTED.
    /// `.fenced` when a newer claim of the task is already recorded (nothing else is written then).
    public func began(_ job: ClaimedJob, facts: TaskFacts, pid: Int32, started: ResultRecord) async throws -> FencedOutcome {
        let op = StoreOperation.began(
            .init(job, facts), pid: pid, started: .init(started, fence: Fence(jobID: job.jobID, token: job.token)))
        return try await perform(op) == .fenced ? .fenced : .done
    }

    /// A quick task's start and end in one transaction (its start was never written on its own).
    public func ranAndEnded(
        _ job: ClaimedJob, facts: TaskFacts, pid: Int32, started: ResultRecord, result: ResultRecord, outcome: String,
        exitStatus: Int32?, detail: String?
    ) async throws -> ResultWriteOutcome {
        let fence = Fence(jobID: job.jobID, token: job.token)
        let op = StoreOperation.sequence([
            .began(.init(job, facts), pid: pid, started: .init(started, fence: fence)),
            .completed(
                .init(result, fence: fence),
                .init(
                    taskID: result.taskId, jobID: job.jobID, datacenter: job.datacenter, token: job.token,
                    outcome: outcome, exitStatus: exitStatus, detail: detail)),
        ])
        return try await perform(op).resultOutcome
    }

    public func ended(_ job: ClaimedJob, result: ResultRecord, outcome: String, exitStatus: Int32?, detail: String?)
        async throws -> ResultWriteOutcome
    {
        let op = StoreOperation.completed(
            .init(result, fence: Fence(jobID: job.jobID, token: job.token)),
            .init(
                taskID: result.taskId, jobID: job.jobID, datacenter: job.datacenter, token: job.token, outcome: outcome,
                exitStatus: exitStatus, detail: detail))
        return try await perform(op).resultOutcome
    }

    /// The ledger records refused results itself (in the same transaction as the refusal).
    public var recordsFencingInLedger: Bool { true }

    public func store(_ record: ResultRecord, fence: Fence?) async throws -> ResultWriteOutcome {
        try await perform(.result(.init(record, fence: fence))).resultOutcome
    }

    public func claimed(_ job: ClaimedJob, facts: TaskFacts) async throws -> FencedOutcome {
        try await perform(.claimed(.init(job, facts))) == .fenced ? .fenced : .done
    }

    public func started(_ job: ClaimedJob, taskID: String, pid: Int32) async throws {
        _ = try await perform(
            .started(.init(taskID: taskID, jobID: job.jobID, datacenter: job.datacenter, token: job.token, pid: pid)))
    }

    public func finished(_ job: ClaimedJob, taskID: String, outcome: String, exitStatus: Int32?, detail: String?)
        async throws
    {
        _ = try await perform(
            .finished(
                .init(
                    taskID: taskID, jobID: job.jobID, datacenter: job.datacenter, token: job.token, outcome: outcome,
                    exitStatus: exitStatus, detail: detail)))
    }

    public func event(
        taskID: String, jobID: String, event: String, worker: String?, datacenter: String?, token: Int64?,
        detail: String?
    ) async throws {
        _ = try await perform(
            .event(
                .init(
                    taskID: taskID, jobID: jobID, event: event, worker: worker, datacenter: datacenter, token: token,
                    detail: detail)))
    }
}
