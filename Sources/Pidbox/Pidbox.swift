#if canImport(Glibc)
    import Glibc
#endif
import CeleryWire
import Foundation
import Logging
import Redis
import TandemRedis
import Worker

/// Celery's remote control for a Tandem worker: listens on `/<db>.celery.pidbox` like a `celery worker` does.
///
/// - `revoke`: recorded durably in `{tandem}:revoked` (sorted set: task id → expiry, ms on Redis's clock, 24 h)
///   and in memory; with `terminate`, the running task is signalled through `onTerminate`. As a
///   `RevocationSource` it answers from memory, then Redis, so a worker that missed the broadcast still honours it.
/// - `ping`: answered like Celery (`{"<node>": {"ok": "pong"}}`) on the sender's reply queue, so
///   `celery inspect ping` and `app.control.ping()` see this worker.
public final class PidboxService: RevocationSource, @unchecked Sendable {
    public static let revokedKey = Keys.revoked

    public let nodeName: String
    public let revokeTTL: Duration
    let client: RedisClient
    let subscriber: RedisSubscriber
    let channel: String
    let logger: Logger
    private let lock = NSLock()
    private var memory: [String: Int64] = [:]  // task id -> expiry (ms)
    private var task: Task<Void, Never>?
    private var clock: Int64 = 0
    private var onTerminate: (@Sendable (String, Int32) -> Void)?

    /// Messages handled, by method (tests and logs).
    public private(set) var handled: [String: Int] = [:]

    public init(configuration: RedisConfiguration, nodeName: String, revokeTTL: Duration = .seconds(86400), logger: Logger) {
        self.nodeName = nodeName
        self.revokeTTL = revokeTTL
        var l = logger
        l[metadataKey: "component"] = "pidbox"
        self.logger = l
        self.client = RedisClient(configuration: configuration, label: "pidbox", logger: l)
        self.subscriber = RedisSubscriber(configuration: configuration, logger: l)
        self.channel = PidboxMessage.channel(db: configuration.database)
    }

    /// Starts listening. `onTerminate(taskID, signal)` is called for `revoke` with `terminate=True`
    /// (the worker passes `runtime.revokeRunning`).
    public func start(onTerminate: @escaping @Sendable (String, Int32) -> Void) {
        lock.lock()
        self.onTerminate = onTerminate
        lock.unlock()
        let stream = subscriber.subscribe(channels: [channel])
        let t = Task { [self] in
            do {
                for try await m in stream { await self.handle(m.message, receivedAt: m.receivedAt) }
            } catch {
                logger.error("pidbox subscription ended: \(error)")
            }
        }
        lock.lock()
        task = t
        lock.unlock()
        logger.info("listening for Celery control messages", metadata: ["channel": .string(channel), "node": .string(nodeName)])
    }

    public func stop() {
        subscriber.close()
        lock.lock()
        task?.cancel()
        lock.unlock()
        client.close()
    }

    func count(_ m: String) {
        lock.lock()
        handled[m, default: 0] += 1
        lock.unlock()
    }

    public func handledCount(_ method: String) -> Int {
        lock.lock()
        defer { lock.unlock() }
        return handled[method] ?? 0
    }

    /// Handles one raw pidbox payload. `receivedAt`: when it came off the wire — Celery's broadcasts expire a
    /// second after they are sent, and a message that arrived in time is not dropped because the one before it
    /// took long to handle (a slow Redis under load once lost the second of two revokes that way).
    public func handle(_ raw: [UInt8], receivedAt: Date = Date()) async {
        let msg: PidboxMessage
        let body: JSONValue
        do {
            msg = try PidboxMessage.decode(raw)
            body = try KombuEnvelope.decode(raw).bodyJSON()
        } catch {
            logger.warning("ignoring an unreadable pidbox message: \(error)")
            return
        }
        if let exp = msg.expires, receivedAt.timeIntervalSince1970 > exp { return }
        guard msg.isFor(node: nodeName) else { return }
        // counted once handled (revoke recorded, reply sent), so "handled" means the effect is visible
        defer { count(msg.method) }
        switch msg.method {
        case "revoke":
            let ids = msg.revokedTaskIDs
            await revoke(ids, terminate: msg.terminate, signal: Self.signalNumber(msg.signal))
            await reply(msg, body: body, ["ok": .string("tasks \(ids.joined(separator: ", ")) flagged as revoked")])
        case "ping":
            await reply(msg, body: body, ["ok": "pong"])
        default:
            // Tandem answers only what liveness probes and the scheduler use; other commands get no reply.
            logger.debug("pidbox command '\(msg.method)' is not supported; ignored")
        }
    }

    /// Records revokes durably and in memory; with `terminate`, signals running copies.
    public func revoke(_ ids: [String], terminate: Bool = false, signal: Int32 = SIGTERM) async {
        guard !ids.isEmpty else { return }
        let ttlMs = revokeTTL.components.seconds * 1000
        var nowMs = Int64(Date().timeIntervalSince1970 * 1000)
        do {
            nowMs = try await client.time().milliseconds
            var cmds: [[String]] = [["ZREMRANGEBYSCORE", Self.revokedKey, "-inf", String(nowMs)]]
            var zadd = ["ZADD", Self.revokedKey]
            for id in ids { zadd += [String(nowMs + ttlMs), id] }
            cmds.append(zadd)
            _ = try await client.pipeline(cmds)
        } catch {
            logger.error("cannot record revoke durably in Redis (kept in memory only): \(error)")
        }
        let cb = lock.withLock { () -> (@Sendable (String, Int32) -> Void)? in
            for id in ids { memory[id] = nowMs + ttlMs }
            return onTerminate
        }
        logger.info("revoked", metadata: ["tasks": .string(ids.joined(separator: ",")), "terminate": "\(terminate)"])
        if terminate, let cb { for id in ids { cb(id, signal) } }
    }

    public func isRevokedLocally(_ taskID: String) -> Bool {
        let nowLocal = Int64(Date().timeIntervalSince1970 * 1000)
        return lock.withLock { memory[taskID] }.map { $0 > nowLocal } ?? false
    }

    public func isRevoked(_ taskID: String) async -> Bool {
        if isRevokedLocally(taskID) { return true }
        do {
            let reply = try await client.send(["ZSCORE", Self.revokedKey, taskID])
            guard let s = reply.string, let exp = Double(s) else { return false }
            let now = try await client.time().milliseconds
            if Int64(exp) > now {
                lock.withLock { memory[taskID] = Int64(exp) }
                return true
            }
            return false
        } catch {
            logger.error("cannot check revokes in Redis (\(error)); going by this worker's memory")
            return false
        }
    }

    /// Publishes a reply the way kombu's Mailbox does: a direct exchange (`reply.celery.pidbox`) whose routing key
    /// is the sender's oid; on Redis that is an LPUSH onto every queue bound with that key
    /// (`_kombu.binding.<exchange>` members `routing_key\x06\x16pattern\x06\x16queue`).
    func reply(_ msg: PidboxMessage, body: JSONValue, _ value: JSONObject) async {
        guard let replyTo = msg.replyTo, let exchange = replyTo["exchange"]?.string,
            let routingKey = replyTo["routing_key"]?.string
        else { return }
        let ticket = body["ticket"]?.string
        let c = lock.withLock { () -> Int64 in
            clock += 1
            return clock
        }
        let replyBody = JSONValue.object(JSONObject([(nodeName, .object(value))])).serialized()
        var headers: JSONObject = ["clock": .int(c)]
        if let ticket { headers["ticket"] = .string(ticket) }
        let element: JSONValue = .object([
            "body": .string(Base64.encode(Array(replyBody.utf8))),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": .object(headers),
            "properties": .object([
                "delivery_mode": 1,
                "delivery_info": .object(["exchange": .string(exchange), "routing_key": .string(routingKey)]),
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": .string(UUID().uuidString.lowercased()),
            ]),
        ])
        do {
            let members = try await client.send(["SMEMBERS", "_kombu.binding.\(exchange)"]).array ?? []
            var queues: [String] = []
            for m in members {
                guard let s = m.string else { continue }
                let parts = s.components(separatedBy: CeleryPublisher.separator)
                if parts.count == 3, parts[0] == routingKey { queues.append(parts[2]) }
            }
            if queues.isEmpty { queues = ["\(routingKey).\(exchange)"] }
            for q in Set(queues) { _ = try await client.send(["LPUSH", q, element.serialized()]) }
        } catch {
            logger.warning("cannot send the pidbox reply: \(error)")
        }
    }

    /// Celery's signal names (`SIGTERM`, `TERM`, `9`) → numbers.
    public static func signalNumber(_ name: String) -> Int32 {
        if let n = Int32(name) { return n }
        var s = name.uppercased()
        if !s.hasPrefix("SIG") { s = "SIG" + s }
        let table: [String: Int32] = [
            "SIGTERM": SIGTERM, "SIGKILL": SIGKILL, "SIGINT": SIGINT, "SIGQUIT": SIGQUIT, "SIGHUP": SIGHUP,
            "SIGUSR1": SIGUSR1, "SIGUSR2": SIGUSR2, "SIGABRT": SIGABRT,
        ]
        return table[s] ?? SIGTERM
    }
}
