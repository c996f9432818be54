import Foundation

/// Produces task messages exactly as the stock celery 5.x client publishes them on Redis (protocol 2).
///
/// Kombu's Redis transport consumes a queue's lists with one `BRPOP plain, plain\x06\x163,
/// plain\x06\x166, plain\x06\x169` (`kombu/transport/redis.py` `_brpop_start`, keys ordered by
/// `priority_steps = [0, 3, 6, 9]`), so the plain list — priority 0–2 — is taken first and priority 9 last.
public enum CeleryPublisher {
    /// Kombu's separator in priority list names and binding members.
    public static let separator = "\u{06}\u{16}"

    /// List-name suffixes in kombu's consume order on Redis (plain list first).
    public static let priorityOrder: [String] = ["", "\u{06}\u{16}3", "\u{06}\u{16}6", "\u{06}\u{16}9"]

    /// The Redis list a message of this priority lands on: kombu rounds down to a step of [0, 3, 6, 9]
    /// (after clamping to 0…9); step 0 is the plain list.
    public static func priorityList(queue: String, priority: Int?) -> String {
        let p = min(max(priority ?? 0, 0), 9)
        let step = p >= 9 ? 9 : p >= 6 ? 6 : p >= 3 ? 3 : 0
        return step == 0 ? queue : "\(queue)\(separator)\(step)"
    }

    /// All lists of a queue, in consume order.
    public static func lists(queue: String) -> [String] { priorityOrder.map { queue + $0 } }

    /// The set kombu SADDs the queue's binding to: `_kombu.binding.<queue>` (celery declares each queue
    /// with a direct exchange of the same name). kombu 5.7 also SADDs `_kombu.binding_permanent.<queue>`.
    public static func bindingKey(queue: String) -> String { "_kombu.binding.\(queue)" }

    /// The binding member: `routing_key\x06\x16pattern\x06\x16queue` with an empty pattern.
    public static func bindingMember(queue: String) -> String { "\(queue)\(separator)\(separator)\(queue)" }

    /// The list and element `apply_async(args, kwargs, queue=queue, …)` LPUSHes with celery 5.5–5.7.
    public static func message(
        taskName: String, id: String, args: [JSONValue], kwargs: JSONObject = .init(), queue: String = "default",
        priority: Int? = nil, eta: Date? = nil, expires: Date? = nil,
        timeLimit: (hard: Double?, soft: Double?) = (nil, nil), deliveryTag: String? = nil
    ) -> (list: String, element: String) {
        func num(_ d: Double?) -> JSONValue {
            guard let d else { return .null }
            if d.rounded() == d && abs(d) < 1e15 { return .int(Int64(d)) }
            return .double(d)
        }
        let embed: JSONValue = .object(["callbacks": .null, "errbacks": .null, "chain": .null, "chord": .null])
        let body = JSONValue.array([.array(args), .object(kwargs), embed]).serialized(style: .python)
        let headers: JSONObject = [
            "lang": "py",
            "task": .string(taskName),
            "id": .string(id),
            "shadow": .null,
            "eta": eta.map { .string(CeleryDate.isoformat($0)) } ?? .null,
            "expires": expires.map { .string(CeleryDate.isoformat($0)) } ?? .null,
            "group": .null,
            "group_index": .null,
            "retries": 0,
            "timelimit": .array([num(timeLimit.hard), num(timeLimit.soft)]),
            "root_id": .string(id),
            "parent_id": .null,
            "argsrepr": .string(pythonRepr(.array(args))),
            "kwargsrepr": .string(pythonRepr(.object(kwargs))),
            "origin": .string(origin),
            "ignore_result": false,
            "replaced_task_nesting": 0,
            "stamped_headers": .null,
            "stamps": .object(JSONObject()),
        ]
        var properties: JSONObject = [
            "correlation_id": .string(id),
            "reply_to": .string(UUID().uuidString.lowercased()),
            "delivery_mode": 2,
        ]
        if let expires {
            // kombu: the AMQP per-message TTL, milliseconds from now, as a string.
            let ms = max(0, Int64((expires.timeIntervalSinceNow * 1000).rounded(.down)))
            properties["expiration"] = .string(String(ms))
        }
        properties["delivery_info"] = .object(["exchange": "", "routing_key": .string(queue)])
        properties["priority"] = .int(Int64(priority ?? 0))
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = .string(deliveryTag ?? UUID().uuidString.lowercased())
        let element: JSONValue = .object([
            "body": .string(Base64.encode(Array(body.utf8))),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": .object(headers),
            "properties": .object(properties),
        ])
        return (priorityList(queue: queue, priority: priority), element.serialized(style: .python))
    }

    /// `gen<pid>@<hostname>`, as celery's `anon_nodename()` writes `headers.origin`.
    static let origin: String = "gen\(ProcessInfo.processInfo.processIdentifier)@\(ProcessInfo.processInfo.hostName)"

    /// Python's `repr()` of a JSON-shaped value, as celery writes `argsrepr`/`kwargsrepr`.
    public static func pythonRepr(_ v: JSONValue) -> String {
        switch v {
        case .null: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .double(let d):
            if d.isNaN { return "nan" }
            if d.isInfinite { return d < 0 ? "-inf" : "inf" }
            return pythonFloatRepr(d)
        case .string(let s):
            let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
            var out = String(quote)
            for u in s.unicodeScalars {
                switch u {
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\r": out += "\\r"
                case "\t": out += "\\t"
                case _ where Character(u) == quote: out += "\\" + String(quote)
                case _ where u.value < 0x20 || u.value == 0x7F:
                    out += "\\x" + (u.value < 16 ? "0" : "") + String(u.value, radix: 16)
                default: out.unicodeScalars.append(u)
                }
            }
            out.append(quote)
            return out
        case .array(let a): return "[" + a.map(pythonRepr).joined(separator: ", ") + "]"
        case .object(let o):
            return "{" + o.pairs.map { pythonRepr(.string($0.0)) + ": " + pythonRepr($0.1) }.joined(separator: ", ")
                + "}"
        }
    }
}
