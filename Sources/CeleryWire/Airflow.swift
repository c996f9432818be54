/// The task names Airflow's Celery executor publishes.
public enum AirflowTaskName {
    /// Airflow 3.x: `args = [workload_json_string]`.
    public static let workload = "execute_workload"
    /// Airflow 2.11 with provider ≥ 3.17.2.
    public static let command = "execute_command"
    /// Airflow 2.7–2.10 (provider ≤ 3.13).
    public static let providerCommand = "airflow.providers.celery.executors.celery_executor_utils.execute_command"
    /// Airflow ≤ 2.6.
    public static let legacyCommand = "airflow.executors.celery_executor.execute_command"
    /// All four spellings: the workload name first, then the three `execute_command` ones.
    public static let all: [String] = [workload, command, providerCommand, legacyCommand]

    /// True for any of the three `execute_command` spellings.
    public static func isCommand(_ name: String) -> Bool {
        name == command || name == providerCommand || name == legacyCommand
    }
}

/// An Airflow 3 workload (`execute_workload`), forwarded verbatim to the task runner.
///
/// Never prints its token: `description`, `debugDescription` and reflection (`dump`) all redact it, and
/// they leave out `json`, which contains it.
public struct AirflowWorkload: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The exact string from `args[0]`: hand this to the runner unchanged.
    public var json: String
    /// `type`: `ExecuteTask`, `ExecuteCallback` (3.2+) or `TestConnection` (3.3+).
    public var kind: String
    /// `ti.id` (ExecuteTask), `callback.id` (ExecuteCallback) or `connection_test_id` (TestConnection).
    public var tiID: String?
    /// `ti.dag_id`.
    public var dagID: String?
    /// `ti.task_id`.
    public var taskID: String?
    /// `ti.run_id`.
    public var runID: String?
    /// `ti.try_number`.
    public var tryNumber: Int?
    /// `ti.map_index` (-1 when not mapped).
    public var mapIndex: Int?
    /// `ti.queue` (or `queue` of a TestConnection).
    public var queue: String?
    /// `log_path`: relative to `[logging] base_log_folder`.
    public var logPath: String?
    /// The JWT the runner presents to the execution API. Secret: never log it.
    public var token: String

    /// The kinds Tandem forwards.
    public static let kinds: Set<String> = ["ExecuteTask", "ExecuteCallback", "TestConnection"]

    /// Reads what Tandem needs from the workload JSON; unknown keys are ignored.
    public static func parse(_ json: String) throws(WireError) -> AirflowWorkload {
        let v: JSONValue
        do {
            v = try JSONValue.parse(json)
        } catch {
            throw WireError(.badWorkload, "execute_workload argument is not JSON (\(error.message))")
        }
        guard case .object(let o) = v else {
            throw WireError(.badWorkload, "execute_workload argument is JSON but not an object")
        }
        guard case .string(let kind)? = o["type"] else {
            throw WireError(.badWorkload, "workload has no 'type'; expected one of \(kinds.sorted())")
        }
        guard kinds.contains(kind) else {
            throw WireError(
                .badWorkload,
                "workload type '\(kind)' is not one Tandem runs (\(kinds.sorted())); "
                    + "is the scheduler newer than this worker?")
        }
        guard case .string(let token)? = o["token"], !token.isEmpty else {
            throw WireError(
                .badWorkload,
                "\(kind) workload has no 'token'; the runner could not authenticate "
                    + "to the execution API (is [api] secret_key / JWT signing configured on the scheduler?)")
        }
        var w = AirflowWorkload(json: json, kind: kind, token: token)
        w.logPath = o["log_path"]?.string
        switch kind {
        case "ExecuteTask":
            guard case .object(let ti)? = o["ti"], case .string(let id)? = ti["id"] else {
                throw WireError(.badWorkload, "ExecuteTask workload has no 'ti.id'")
            }
            w.tiID = id
            w.dagID = ti["dag_id"]?.string
            w.taskID = ti["task_id"]?.string
            w.runID = ti["run_id"]?.string
            w.tryNumber = ti["try_number"]?.int.map { Int($0) }
            w.mapIndex = ti["map_index"]?.int.map { Int($0) }
            w.queue = ti["queue"]?.string
        case "ExecuteCallback":
            w.tiID = o["callback"]?["id"]?.string
        default:
            w.tiID = o["connection_test_id"]?.string
            w.queue = o["queue"]?.string
        }
        return w
    }

    /// A workload with the given fields; prefer `parse(_:)`, which reads them all from `json`.
    public init(
        json: String, kind: String, token: String, tiID: String? = nil, dagID: String? = nil, taskID: String? = nil,
        runID: String? = nil, tryNumber: Int? = nil, mapIndex: Int? = nil, queue: String? = nil,
        logPath: String? = nil
    ) {
        self.json = json
        self.kind = kind
        self.token = token
        self.tiID = tiID
        self.dagID = dagID
        self.taskID = taskID
        self.runID = runID
        self.tryNumber = tryNumber
        self.mapIndex = mapIndex
        self.queue = queue
        self.logPath = logPath
    }

    public var description: String {
        var parts = ["kind: \(kind)"]
        if let tiID { parts.append("id: \(tiID)") }
        if let dagID { parts.append("dag: \(dagID)") }
        if let taskID { parts.append("task: \(taskID)") }
        if let runID { parts.append("run: \(runID)") }
        if let tryNumber { parts.append("try: \(tryNumber)") }
        if let mapIndex, mapIndex >= 0 { parts.append("map_index: \(mapIndex)") }
        if let queue { parts.append("queue: \(queue)") }
        parts.append("token: <redacted>")
        return "AirflowWorkload(\(parts.joined(separator: ", ")))"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "kind": kind, "tiID": tiID as Any, "dagID": dagID as Any, "taskID": taskID as Any,
                "runID": runID as Any,
                "tryNumber": tryNumber as Any, "mapIndex": mapIndex as Any, "queue": queue as Any,
                "logPath": logPath as Any, "token": "<redacted>", "json": "<\(json.utf8.count) bytes, redacted>",
            ])
    }
}

/// What an Airflow task message asks a worker to do.
public enum AirflowPayload: Sendable {
    /// Airflow 2: run this argv (validated: `airflow tasks run …`, strings only, no NULs).
    case command(argv: [String])
    /// Airflow 3: hand this workload to the task runner.
    case workload(AirflowWorkload)

    /// Longest argv accepted, in elements and in bytes per element.
    public static let maxArgvCount = 256
    public static let maxArgBytes = 64 * 1024

    /// Classifies a decoded task; anything that is not an Airflow task throws with the reason.
    public static func classify(_ task: CeleryTask) throws(WireError) -> AirflowPayload {
        if task.name == AirflowTaskName.workload {
            guard task.args.count == 1, case .string(let json) = task.args[0] else {
                throw WireError(
                    .badArgs,
                    "task \(task.id): execute_workload takes exactly one string argument "
                        + "(the workload JSON); got \(task.args.count) argument(s)")
            }
            return .workload(try AirflowWorkload.parse(json))
        }
        if AirflowTaskName.isCommand(task.name) {
            guard task.args.count == 1, case .array(let items) = task.args[0] else {
                throw WireError(.badArgs, "task \(task.id): \(task.name) takes exactly one argument, the argv list")
            }
            return .command(argv: try validateArgv(items, taskID: task.id))
        }
        throw WireError(
            .unknownTask,
            "task \(task.id) is '\(task.name)', not an Airflow task Tandem runs "
                + "(\(AirflowTaskName.all.joined(separator: ", "))); route it to a Celery worker")
    }

    static func validateArgv(_ items: [JSONValue], taskID: String) throws(WireError) -> [String] {
        guard items.count <= maxArgvCount else {
            throw WireError(.badArgv, "task \(taskID): argv has \(items.count) elements (max \(maxArgvCount))")
        }
        var argv: [String] = []
        argv.reserveCapacity(items.count)
        for (n, item) in items.enumerated() {
            guard case .string(let s) = item else {
                throw WireError(.badArgv, "task \(taskID): argv[\(n)] is not a string; refusing to run it")
            }
            guard !s.utf8.contains(0) else {
                throw WireError(.badArgv, "task \(taskID): argv[\(n)] contains a NUL byte; refusing to run it")
            }
            guard s.utf8.count <= maxArgBytes else {
                throw WireError(.badArgv, "task \(taskID): argv[\(n)] is longer than \(maxArgBytes) bytes")
            }
            argv.append(s)
        }
        guard argv.count > 3, argv[0] == "airflow", argv[1] == "tasks", argv[2] == "run" else {
            throw WireError(
                .badArgv,
                "task \(taskID): argv does not start with [\"airflow\", \"tasks\", \"run\"] "
                    + "(got \(argv.prefix(3))); Airflow's executor only sends that command, refusing to run it")
        }
        return argv
    }
}
