import Foundation

/// Celery task states, as stored in `status`.
public enum CeleryState: String, Sendable, CaseIterable {
    case pending = "PENDING"
    case started = "STARTED"
    case success = "SUCCESS"
    case failure = "FAILURE"
    case retry = "RETRY"
    case
        revoked = "REVOKED"

    /// SUCCESS, FAILURE and REVOKED: states that are final and carry a `date_done`.
    public var isReady: Bool { self == .success || self == .failure || self == .revoked }
}

/// A task result as Celery's result backends store it, and as Airflow's scheduler reads it back.
public struct ResultRecord: Sendable, Equatable {
    /// The Celery task id.
    public var taskId: String
    /// The state.
    public var state: CeleryState
    /// `.null` for an Airflow SUCCESS; `{"pid", "hostname"}` for STARTED; for FAILURE `.null` or
    /// `{"exc_type", "exc_message": [...], "exc_module"}` — never a bare string (it breaks the scheduler's
    /// whole fetch batch).
    public var result: JSONValue
    /// The traceback text, if any.
    public var traceback: String?
    /// When the task finished (nil for STARTED/PENDING/RETRY).
    public var dateDone: Date?

    /// A record with every field given.
    public init(
        taskId: String, state: CeleryState, result: JSONValue = .null, traceback: String? = nil,
        dateDone: Date? = nil
    ) {
        self.taskId = taskId
        self.state = state
        self.result = result
        self.traceback = traceback
        self.dateDone = dateDone
    }

    /// SUCCESS with a null result, done now.
    public static func success(taskId: String, at date: Date = Date()) -> ResultRecord {
        ResultRecord(taskId: taskId, state: .success, result: .null, dateDone: date)
    }

    /// STARTED `{"pid": pid, "hostname": hostname}` with no `date_done`, as a worker with
    /// `task_track_started` writes it.
    public static func started(taskId: String, pid: Int, hostname: String) -> ResultRecord {
        ResultRecord(
            taskId: taskId, state: .started,
            result: .object(["pid": .int(Int64(pid)), "hostname": .string(hostname)]))
    }

    /// FAILURE with Celery's exception dict (`exc_module` `builtins` for built-in types).
    public static func failure(
        taskId: String, excType: String = "Exception", excMessage: String,
        excModule: String = "builtins", traceback: String? = nil,
        at date: Date = Date()
    ) -> ResultRecord {
        ResultRecord(
            taskId: taskId, state: .failure, result: exception(excType, excMessage, excModule),
            traceback: traceback, dateDone: date)
    }

    /// REVOKED with `TaskRevokedError(reason)`, as `mark_as_revoked` writes it.
    public static func revoked(taskId: String, reason: String = "revoked", at date: Date = Date()) -> ResultRecord {
        ResultRecord(
            taskId: taskId, state: .revoked,
            result: exception("TaskRevokedError", reason, "celery.exceptions"), dateDone: date)
    }

    static func exception(_ type: String, _ message: String, _ module: String) -> JSONValue {
        .object(["exc_type": .string(type), "exc_message": .array([.string(message)]), "exc_module": .string(module)])
    }

    /// The Redis key Celery uses: `celery-task-meta-<id>`. Write with SETEX and PUBLISH on the same name.
    public var redisKey: String { "celery-task-meta-\(taskId)" }

    /// The value for `celery-task-meta-<id>`, byte for byte as celery 5.5–5.7's Redis backend writes it:
    /// `{"status": …, "result": …, "traceback": …, "children": null, "date_done": …, "task_id": …}`.
    /// `children` is null when there are none (verified by capture); `date_done` is
    /// `2024-01-01T00:00:00.123456+00:00`.
    public func redisValue() -> String {
        let v: JSONValue = .object([
            "status": .string(state.rawValue),
            "result": result,
            "traceback": traceback.map { .string($0) } ?? .null,
            "children": .null,
            "date_done": dateDone.map { .string(CeleryDate.isoformat($0)) } ?? .null,
            "task_id": .string(taskId),
        ])
        return v.serialized(style: .python)
    }

    /// `celery_taskmeta.result` for the database backend: a safe pickle (protocol 2; only None, bool, int,
    /// float, str, list and dict opcodes) that celery ≤ 5.6 (PickleType) and 5.7 (`\x80` → pickle fallback)
    /// both read. Nil (SQL NULL) for FAILURE and REVOKED: under 5.7 the provider's DB fetcher crashes on a
    /// FAILURE row whose result is not NULL, and a faithful revoked result would need an exception object.
    public func databaseResult() -> [UInt8]? {
        switch state {
        case .failure, .revoked: return nil
        default: return SafePickle.dumps(result)
        }
    }

    /// Reads a `celery-task-meta-<id>` value (any celery 4–5 version).
    public static func decode(redisValue raw: [UInt8]) throws(WireError) -> ResultRecord {
        let v: JSONValue
        do { v = try JSONValue.parse(raw) } catch {
            throw WireError(.notJSON, "result record is not JSON (\(error.message))")
        }
        guard case .string(let status)? = v["status"] else {
            throw WireError(.missingField, "result record has no 'status'")
        }
        guard let state = CeleryState(rawValue: status) else {
            throw WireError(.badBody, "result record status '\(status)' is not a Celery state")
        }
        guard case .string(let id)? = v["task_id"] else {
            throw WireError(.missingField, "result record has no 'task_id'")
        }
        return ResultRecord(
            taskId: id, state: state, result: v["result"] ?? .null, traceback: v["traceback"]?.string,
            dateDone: v["date_done"]?.string.flatMap(CeleryDate.parse))
    }
}
