/// A Celery remote-control message (`app.control.*`), as PUBLISHed on `/<db>.celery.pidbox`.
///
/// The published payload is a kombu envelope whose body is
/// `{"method": "revoke", "arguments": {"task_id": …, "terminate": false, "signal": "SIGTERM"},
///   "destination": null, "pattern": null, "matcher": null}`. Only subscribers at that moment see it.
public struct PidboxMessage: Sendable {
    /// The control command, e.g. `revoke`.
    public var method: String
    /// The command's arguments.
    public var arguments: JSONObject
    /// The worker node names it is for; nil means every worker.
    public var destination: [String]?
    /// `reply_to` (`{"exchange", "routing_key"}`) when the sender waits for replies.
    public var replyTo: JSONObject?
    /// `headers.expires` (epoch seconds) when the sender set a TTL.
    public var expires: Double?

    /// A control message with every field given.
    public init(
        method: String, arguments: JSONObject = JSONObject(), destination: [String]? = nil,
        replyTo: JSONObject? = nil, expires: Double? = nil
    ) {
        self.method = method
        self.arguments = arguments
        self.destination = destination
        self.replyTo = replyTo
        self.expires = expires
    }

    /// The pub/sub channel control messages go to for Redis database `db`.
    public static func channel(db: Int = 0) -> String { "/\(db).celery.pidbox" }

    /// Decodes a payload received on the pidbox channel.
    public static func decode(_ raw: [UInt8]) throws(WireError) -> PidboxMessage {
        let env: KombuEnvelope
        do { env = try KombuEnvelope.decode(raw) } catch {
            throw WireError(.badControl, "pidbox message is not a kombu envelope: \(error.message)")
        }
        let body: JSONValue
        do { body = try env.bodyJSON() } catch {
            throw WireError(.badControl, "pidbox message body unreadable: \(error.message)")
        }
        guard case .string(let method)? = body["method"] else {
            throw WireError(.badControl, "pidbox message has no 'method'")
        }
        var dest: [String]?
        switch body["destination"] {
        case nil, .null?: dest = nil
        case .array(let a)?: dest = a.compactMap(\.string)
        case .string(let s)?: dest = [s]
        default: throw WireError(.badControl, "pidbox 'destination' is neither null nor a list of node names")
        }
        return PidboxMessage(
            method: method, arguments: body["arguments"]?.object ?? JSONObject(), destination: dest,
            replyTo: body["reply_to"]?.object, expires: env.headers["expires"]?.double)
    }

    /// For `revoke`: the task ids (`task_id` may be one id or a list).
    public var revokedTaskIDs: [String] {
        guard method == "revoke" else { return [] }
        switch arguments["task_id"] {
        case .string(let s)?: return [s]
        case .array(let a)?: return a.compactMap(\.string)
        default: return []
        }
    }

    /// For `revoke`: whether the sender asked to kill a running task.
    public var terminate: Bool { arguments["terminate"]?.bool ?? false }

    /// For `revoke`: the signal name to kill with (Celery's default `SIGTERM`).
    public var signal: String { arguments["signal"]?.string ?? "SIGTERM" }

    /// True when a worker named `node` (e.g. `celery@host`) should act on it.
    public func isFor(node: String) -> Bool { destination.map { $0.contains(node) } ?? true }
}
