import CeleryWire
import Foundation
import Redis

/// A message a stock Celery worker took from Airflow's list and never acked: kombu's Redis transport keeps it in
/// the `unacked` hash (delivery tag -> `[payload, exchange, routing_key]`, reserved at `unacked_index`'s score)
/// until the worker acks it, or, once `visibility_timeout` has passed, any Celery worker restores it. Tandem reads
/// only Airflow's lists, so after a move from Celery to Tandem what a killed Celery worker held would wait there
/// for good (Protocol/SPEC.md, decision 28).
public struct CeleryReserved: Sendable {
    public var deliveryTag: String
    /// The hash value exactly as read (adopt.lua restores only if it is unchanged).
    public var stored: String
    /// When the Celery worker reserved it (its host's clock), and how long ago by Redis's.
    public var reservedAt: Date?
    public var ageMs: Int64?
    public var taskID: String
    /// `dag.task run` of an Airflow task, when the message is one.
    public var airflowTarget: String?
    /// Where kombu would restore it (exchange binding lookup; its priority sibling); empty: nowhere routable.
    public var lists: [String]
    /// What to push: the payload with `redelivered` marked, serialized as kombu's `json.dumps` writes it.
    public var element: String
}

/// What became of one adoption.
public enum AdoptOutcome: Sendable, Equatable {
    case restored(lists: [String])
    /// Acked or restored by a Celery worker since it was read.
    case gone
    /// kombu's restore mutex is held: a Celery worker is restoring now.
    case mutexHeld
    /// No binding routes its exchange and routing key to a queue.
    case unroutable
}

extension BrokerInspector {
    static let unacked = "unacked", unackedIndex = "unacked_index", unackedMutex = "unacked_mutex"

    /// How many messages kombu's `unacked` hash holds, and how long ago (Redis's clock) the oldest was reserved.
    public func celeryReservedCount() async throws -> (count: Int, oldestAgeMs: Int64?) {
        let now = Double(try await client.time().milliseconds) / 1000
        let r = try await client.pipeline([["HLEN", Self.unacked], ["ZRANGE", Self.unackedIndex, "0", "0", "WITHSCORES"]])
        let oldest = (r[1].array ?? []).dropFirst().first?.string.flatMap(Double.init)
        return (Int(r[0].int ?? 0), oldest.map { Int64((now - $0) * 1000) })
    }

    /// kombu's unacked messages, oldest first (at most `limit`).
    public func celeryReserved(limit: Int = 10_000) async throws -> [CeleryReserved] {
        let now = Double(try await client.time().milliseconds) / 1000
        let scored = try await client.send(["ZRANGE", Self.unackedIndex, "0", String(limit - 1), "WITHSCORES"]).array ?? []
        var reservedAt: [String: Double] = [:]
        var tags: [String] = []
        for i in stride(from: 0, to: scored.count - 1, by: 2) {
            guard let tag = scored[i].string else { continue }
            tags.append(tag)
            reservedAt[tag] = scored[i + 1].string.flatMap(Double.init)
        }
        // entries the index lacks (a worker killed between its two writes is not possible, kombu pipelines them;
        // but a hand-made or foreign entry may be): found by HKEYS, ordered after the indexed ones
        let all = (try await client.send(["HKEYS", Self.unacked]).array ?? []).compactMap(\.string)
        tags += all.filter { reservedAt[$0] == nil }.prefix(max(0, limit - tags.count))
        if tags.isEmpty { return [] }
        let values = try await client.pipeline(tags.map { ["HGET", Self.unacked, $0] })
        var bindings: [String: [(routingKey: String, queue: String)]] = [:]
        var out: [CeleryReserved] = []
        for (tag, v) in zip(tags, values) {
            guard let stored = v.string else { continue }  // acked meanwhile
            var r = CeleryReserved(
                deliveryTag: tag, stored: stored, reservedAt: reservedAt[tag].map { Date(timeIntervalSince1970: $0) },
                ageMs: reservedAt[tag].map { Int64((now - $0) * 1000) }, taskID: "?", airflowTarget: nil, lists: [],
                element: "")
            guard case .array(let parts)? = try? JSONValue.parse(stored), parts.count == 3,
                case .object(var payload) = parts[0]
            else {
                out.append(r)  // not kombu's shape: shown, never restored
                continue
            }
            let exchange = parts[1].string ?? "", routingKey = parts[2].string ?? ""
            if let task = try? CeleryTask.decode(raw: Array(JSONValue.object(payload).serialized(style: .python).utf8)) {
                r.taskID = task.id
                r.airflowTarget = task.airflowTarget
            }
            // kombu's _do_restore_message: mark it redelivered, then push to every queue the binding names
            if case .object(var headers)? = payload["headers"] {
                headers["redelivered"] = .bool(true)
                payload["headers"] = .object(headers)
            }
            if case .object(var properties)? = payload["properties"] {
                if case .object(var info)? = properties["delivery_info"] {
                    info["redelivered"] = .bool(true)
                    properties["delivery_info"] = .object(info)
                }
                payload["properties"] = .object(properties)
            }
            r.element = JSONValue.object(payload).serialized(style: .python)
            var queues: [String]
            if exchange.isEmpty {
                queues = routingKey.isEmpty ? [] : [routingKey]
            } else {
                if bindings[exchange] == nil { bindings[exchange] = try await self.bindings(exchange: exchange) }
                queues = Array(Set(bindings[exchange]!.filter { $0.routingKey == routingKey }.map(\.queue))).sorted()
            }
            let priority = Self.kombuPriorityStep(payload["properties"]?["priority"])
            r.lists = queues.map { priority == 0 ? $0 : "\($0)\u{06}\u{16}\(priority)" }
            out.append(r)
        }
        return out
    }

    /// Restores one reserved message to its lists, as kombu's restore does (adopt.lua).
    public func adopt(_ r: CeleryReserved) async throws -> AdoptOutcome {
        if r.lists.isEmpty || r.element.isEmpty { return .unroutable }
        let result = try await client.eval(
            BrokerScripts.adopt, keys: [Self.unacked, Self.unackedIndex, Self.unackedMutex] + r.lists,
            args: [r.deliveryTag, r.stored, r.element]).int
        switch result {
        case 1: return .restored(lists: r.lists)
        case -1: return .mutexHeld
        default: return .gone
        }
    }

    /// `_kombu.binding.<exchange>` as (routing key, queue) pairs.
    func bindings(exchange: String) async throws -> [(routingKey: String, queue: String)] {
        (try await client.send(["SMEMBERS", "_kombu.binding.\(exchange)"]).array ?? []).compactMap { m in
            guard let parts = m.string?.components(separatedBy: "\u{06}\u{16}"), parts.count == 3 else { return nil }
            return (parts[0], parts[2])
        }
    }

    /// kombu's Redis priority: `properties.priority` clamped to 0…9, then down to its step (0, 3, 6, 9).
    static func kombuPriorityStep(_ v: JSONValue?) -> Int {
        let n: Int
        switch v {
        case .int(let i)?: n = Int(max(0, min(9, i)))
        case .double(let d)?: n = Int(max(0, min(9, d)))
        case .string(let s)?: n = Int(s).map { max(0, min(9, $0)) } ?? 0
        default: n = 0
        }
        return [0, 3, 6, 9].last { $0 <= n } ?? 0
    }
}
