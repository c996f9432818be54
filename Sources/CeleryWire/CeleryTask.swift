import Foundation

/// A Celery task message, protocol 1 (everything in the body) or 2 (metadata in headers).
///
/// `args`/`kwargs` are kept verbatim, kombu type tags included; read tags with `JSONValue.kombuTag`.
public struct CeleryTask: Sendable {
    /// 1 or 2.
    public var protocolVersion: Int
    /// The task id (`headers.id` / body `id`): also the result key and Airflow's external executor id.
    public var id: String
    /// The task name (`headers.task` / body `task`).
    public var name: String
    /// Positional arguments, verbatim.
    public var args: [JSONValue]
    /// Keyword arguments, verbatim.
    public var kwargs: JSONObject
    /// Run no earlier than this.
    public var eta: Date?
    /// Past this the task is REVOKED, not run.
    public var expires: Date?
    /// `timelimit[0]`: seconds until the task is killed.
    public var hardTimeLimit: Double?
    /// `timelimit[1]`: seconds until the task is asked to stop.
    public var softTimeLimit: Double?
    /// How many times the task has been retried.
    public var retries: Int
    /// The first task of the workflow this belongs to (protocol 2).
    public var rootId: String?
    /// The task that sent this one (protocol 2).
    public var parentId: String?
    /// `properties.reply_to`.
    public var replyTo: String?
    /// `properties.delivery_tag`: the ack key.
    public var deliveryTag: String?
    /// `properties.priority`.
    public var priority: Int?
    /// True when this is a redelivery of a message a consumer took and did not ack.
    public var redelivered: Bool
    /// `headers.ignore_result` (protocol 2): the publisher does not want a result stored.
    public var ignoreResult: Bool

    /// A task with every field given (for tests and for code that builds tasks rather than decoding them).
    public init(
        protocolVersion: Int = 2, id: String, name: String, args: [JSONValue] = [], kwargs: JSONObject = JSONObject(),
        eta: Date? = nil, expires: Date? = nil, hardTimeLimit: Double? = nil, softTimeLimit: Double? = nil,
        retries: Int = 0, rootId: String? = nil, parentId: String? = nil, replyTo: String? = nil,
        deliveryTag: String? = nil, priority: Int? = nil, redelivered: Bool = false, ignoreResult: Bool = false
    ) {
        self.protocolVersion = protocolVersion
        self.id = id
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.eta = eta
        self.expires = expires
        self.hardTimeLimit = hardTimeLimit
        self.softTimeLimit = softTimeLimit
        self.retries = retries
        self.rootId = rootId
        self.parentId = parentId
        self.replyTo = replyTo
        self.deliveryTag = deliveryTag
        self.priority = priority
        self.redelivered = redelivered
        self.ignoreResult = ignoreResult
    }

    /// Reads the task out of a decoded envelope.
    public static func decode(_ envelope: KombuEnvelope) throws(WireError) -> CeleryTask {
        let body = try envelope.bodyJSON()
        let h = envelope.headers
        var t = CeleryTask(
            protocolVersion: 2, id: "", name: "", args: [], kwargs: JSONObject(), eta: nil, expires: nil,
            hardTimeLimit: nil, softTimeLimit: nil, retries: 0, rootId: nil, parentId: nil,
            replyTo: envelope.properties["reply_to"]?.string, deliveryTag: envelope.deliveryTag,
            priority: envelope.priority, redelivered: envelope.redelivered, ignoreResult: false)
        let meta: JSONObject
        if let task = h["task"] {
            // Protocol 2: body is [args, kwargs, embed].
            guard case .string(let name) = task else {
                throw WireError(.missingField, "headers.task is not a string; cannot tell which task to run")
            }
            guard case .string(let id)? = h["id"], !id.isEmpty else {
                throw WireError(
                    .missingField,
                    "protocol 2 message for '\(name)' has no headers.id; "
                        + "it cannot be acknowledged or reported: was it published by a non-Celery client?")
            }
            guard case .array(let parts) = body, parts.count >= 2 else {
                throw WireError(.badBody, "protocol 2 body of task \(id) is not [args, kwargs, embed]")
            }
            guard case .array(let args) = parts[0] else {
                throw WireError(.badArgs, "task \(id) ('\(name)'): args is not a list")
            }
            guard case .object(let kwargs) = parts[1] else {
                throw WireError(.badArgs, "task \(id) ('\(name)'): kwargs is not an object")
            }
            t.name = name
            t.id = id
            t.args = args
            t.kwargs = kwargs
            t.rootId = h["root_id"]?.string
            t.parentId = h["parent_id"]?.string
            t.ignoreResult = h["ignore_result"]?.bool ?? false
            meta = h
        } else {
            // Protocol 1: everything in the body.
            t.protocolVersion = 1
            guard case .object(let b) = body else {
                throw WireError(
                    .badBody,
                    "message has no headers.task and its body is not a protocol 1 task "
                        + "object: not a Celery task message")
            }
            guard case .string(let name)? = b["task"] else {
                throw WireError(.missingField, "protocol 1 task body has no 'task' name")
            }
            guard case .string(let id)? = b["id"], !id.isEmpty else {
                throw WireError(.missingField, "protocol 1 task body for '\(name)' has no 'id'")
            }
            t.name = name
            t.id = id
            switch b["args"] ?? .array([]) {
            case .array(let a): t.args = a
            default: throw WireError(.badArgs, "task \(id) ('\(name)'): args is not a list")
            }
            switch b["kwargs"] ?? .object(JSONObject()) {
            case .object(let k): t.kwargs = k
            case .null: break
            default: throw WireError(.badArgs, "task \(id) ('\(name)'): kwargs is not an object")
            }
            meta = b
        }
        t.eta = try date(meta["eta"], "eta", t.id)
        t.expires = try date(meta["expires"], "expires", t.id)
        if case .array(let tl)? = meta["timelimit"] {
            t.hardTimeLimit = tl.count > 0 ? tl[0].double : nil
            t.softTimeLimit = tl.count > 1 ? tl[1].double : nil
        }
        t.retries = Int(meta["retries"]?.int ?? 0)
        return t
    }

    /// Decodes an envelope and the task in it.
    public static func decode(raw: [UInt8]) throws(WireError) -> CeleryTask {
        try decode(try KombuEnvelope.decode(raw))
    }

    private static func date(_ v: JSONValue?, _ field: String, _ id: String) throws(WireError) -> Date? {
        switch v {
        case nil, .null?: return nil
        case .string(let s)?:
            guard let d = CeleryDate.parse(s) else {
                throw WireError(.badBody, "task \(id): \(field) '\(s)' is not an ISO-8601 date")
            }
            return d
        default:
            throw WireError(.badBody, "task \(id): \(field) is not an ISO-8601 string")
        }
    }

    /// The Airflow task this message runs, for people: "dag.task run" from an `airflow tasks run DAG TASK RUN`
    /// command or from a workload's `ti`; nil for anything else.
    public var airflowTarget: String? {
        if AirflowTaskName.isCommand(name), let argv = args.first?.array?.compactMap(\.string),
            let run = argv.firstIndex(of: "run"), run > 0, argv[run - 1] == "tasks", argv.count > run + 3
        {
            return "\(argv[run + 1]).\(argv[run + 2]) \(argv[run + 3])"
        }
        if name == AirflowTaskName.workload, let json = args.first?.string, let w = try? AirflowWorkload.parse(json),
            let dag = w.dagID, let task = w.taskID
        {
            return "\(dag).\(task)" + (w.runID.map { " " + $0 } ?? "")
        }
        return nil
    }

    /// True when `expires` is set and already past at `now`: such a task is REVOKED, not run.
    public func isExpired(at now: Date = Date()) -> Bool {
        guard let expires else { return false }
        return expires <= now
    }
}
