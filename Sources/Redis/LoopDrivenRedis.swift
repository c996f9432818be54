import ClientSupport
import Dispatch
import Foundation
import Logging

/// A Redis connection an `IOLoop` drives: commands are written and replies read on the loop's thread, and the
/// callers resumed there, so a call wakes no thread of its own (a blocking client's thread costs two switches per
/// call). Callers' commands go out as they come, several in flight at once on the one socket (Redis answers in
/// order), so far from Redis no call waits behind another's round trip either.
///
/// Connecting blocks (TCP connect, AUTH, SELECT, Sentinel), so it happens on a queue of its own; requests made
/// meanwhile wait for it. After an I/O error, a timeout or a READONLY reply the connection is dropped, the calls in
/// flight fail (as a blocking client's would) and the next call reconnects.
final class LoopDrivenRedis: IOSource, @unchecked Sendable {
    struct Hooks: Sendable {
        /// A connection was opened.
        var connected: @Sendable () -> Void
        /// The connection was lost or dropped.
        var lost: @Sendable () -> Void
        /// The client was closed: no more calls.
        var isClosed: @Sendable () -> Bool
        /// Sentinel announced a new master since the last look (and the flag is cleared).
        var takeMasterSwitch: @Sendable () -> Bool
    }

    private struct Request: Sendable {
        var commands: [[[UInt8]]]
        var replies: [RedisValue] = []
        var deadline: ContinuousClock.Instant?
        var done: @Sendable (Result<[RedisValue], RedisError>) -> Void
        /// The command whose reply comes next, for error messages.
        var current: [[UInt8]] { replies.count < commands.count ? commands[replies.count] : [] }
    }

    private struct Opened: @unchecked Sendable { let connection: RedisConnection }

    private let loop: any IOLoop
    private let configuration: RedisConfiguration
    private let logger: Logger
    private let hooks: Hooks
    private let connector: DispatchQueue

    // Touched only on the loop's thread.
    private var connection: RedisConnection?
    private var fd: Int32 = -1
    private var connecting = false
    private var backoff = Backoff()
    /// Waiting for a connection.
    private var waiting: [Request] = []
    /// Sent, in order; those before `head` are answered.
    private var inFlight: [Request] = []
    private var head = 0
    /// The call whose replies come next.
    private var awaiting: Request? { head < inFlight.count ? inFlight[head] : nil }
    private var writePending = false
    /// No new requests on this connection (READONLY, a new master): it is dropped once its answers are in.
    private var retiring = false

    init(loop: any IOLoop, configuration: RedisConfiguration, label: String, logger: Logger, hooks: Hooks) {
        self.loop = loop
        self.configuration = configuration
        self.logger = logger
        self.hooks = hooks
        connector = DispatchQueue(label: "tandem.redis.\(label).connect")
    }

    /// Sends `commands` (none: only connects) and returns one reply per command, error replies included.
    func exchange(_ commands: [[[UInt8]]]) async throws(RedisError) -> [RedisValue] {
        let result = await withCheckedContinuation { (c: CheckedContinuation<Result<[RedisValue], RedisError>, Never>) in
            let request = Request(commands: commands, done: { c.resume(returning: $0) })
            if loop.inLoop { submit(request) } else { loop.execute { self.submit(request) } }
        }
        return try result.get()
    }

    /// Drops the connection; waiting and unanswered calls fail with `.closed`.
    func close() {
        loop.execute { [self] in
            let orphans = waiting + inFlight[head...]
            waiting = []
            inFlight = []
            head = 0
            drop()
            for r in orphans { r.done(.failure(closedError)) }
        }
    }

    private var closedError: RedisError {
        RedisError(code: .closed, message: "Redis client for \(configuration.location) is closed")
    }

    // MARK: - On the loop

    private func submit(_ request: Request) {
        if hooks.isClosed() { return request.done(.failure(closedError)) }
        if hooks.takeMasterSwitch(), connection != nil { retiring = true }
        if let connection, !retiring {
            send(request, on: connection)
        } else {
            waiting.append(request)
            reconnectIfIdle()
        }
    }

    private func send(_ request: Request, on connection: RedisConnection) {
        if request.commands.isEmpty { return request.done(.success([])) }
        var r = request
        r.deadline = configuration.commandTimeout.map { .now + $0 }
        inFlight.append(r)
        do {
            for args in request.commands { try connection.append(args) }
            if !writePending { try flush(connection, during: request.commands[0]) }
        } catch {
            broken(error)
        }
    }

    private func flush(_ connection: RedisConnection, during args: [[UInt8]]) throws(RedisError) {
        let wantsWrite = try !connection.flush(during: args)
        // the socket's buffer was full: wake when it takes more (or it has, and only reads matter again)
        if wantsWrite != writePending {
            writePending = wantsWrite
            loop.setWantsWrite(fd, wantsWrite)
        }
    }

    func ready() {
        guard let connection else { return }
        do {
            if writePending { try flush(connection, during: inFlight.last?.commands[0] ?? []) }
            try connection.readAvailable(during: awaiting?.current ?? [])
            while let reply = try connection.nextReply(during: awaiting?.current ?? []) {
                try deliver(reply)
            }
        } catch {
            broken(error)
        }
        reconnectIfIdle()
    }

    private func deliver(_ reply: RedisValue) throws(RedisError) {
        guard head < inFlight.count else {
            throw RedisError(
                code: .protocolError,
                message: "Redis at \(configuration.location) sent a reply no command was waiting for; the connection was reset and the next call reconnects")
        }
        if case .error(let e) = reply, e.hasPrefix("READONLY"), !retiring {
            // a demoted master: finish what is in flight, then reconnect (via Sentinel) for what comes next
            retiring = true
            logger.warning("Redis answered READONLY; reconnecting on next call",
                           metadata: [RedisLogKey.endpoint: "\(configuration.redacted)"])
        }
        inFlight[head].replies.append(reply)
        guard inFlight[head].replies.count == inFlight[head].commands.count else { return }
        let answered = inFlight[head]
        head += 1
        if head == inFlight.count {
            inFlight.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 {
            inFlight.removeFirst(head)
            head = 0
        }
        answered.done(.success(answered.replies))
    }

    var deadline: ContinuousClock.Instant? { awaiting?.deadline }

    func expire(now: ContinuousClock.Instant) {
        guard let late = awaiting, let d = late.deadline, d <= now else { return }
        let name = late.current.first.map { String(decoding: $0, as: UTF8.self).uppercased() } ?? "command"
        let limit = configuration.commandTimeout.map { " within \($0.shortDescription)" } ?? ""
        broken(RedisError(
            code: .timeout,
            message: "Redis at \(configuration.location) did not answer \(name)\(limit) (command timeout); the connection was reset and the next call reconnects"))
        reconnectIfIdle()
    }

    /// The connection failed: every call in flight fails with `error`; the next call reconnects.
    private func broken(_ error: RedisError) {
        let failed = inFlight[head...]
        inFlight = []
        head = 0
        drop()
        backoff.failed()
        logger.warning("Redis connection lost", metadata: [
            RedisLogKey.endpoint: "\(configuration.redacted)", RedisLogKey.error: "\(error.message)",
        ])
        for r in failed { r.done(.failure(error)) }
    }

    private func drop() {
        if connection != nil {
            loop.unregister(fd)
            connection = nil  // closes the socket
            fd = -1
            hooks.lost()
        }
        writePending = false
        retiring = false
    }

    /// Drops a retiring connection once its answers are in; opens one when calls wait for it.
    private func reconnectIfIdle() {
        if retiring, head == inFlight.count { drop() }
        guard connection == nil, !connecting, !waiting.isEmpty else { return }
        connecting = true
        let backoff = self.backoff
        let configuration = self.configuration
        let logger = self.logger
        connector.async { [self] in
            backoff.wait(limit: configuration.connectTimeout)
            let result = Result { () throws(RedisError) -> Opened in
                let c = try RedisConnector.establish(configuration, logger: logger)
                try c.makeNonBlocking()
                return Opened(connection: c)
            }
            loop.execute { self.opened(result) }
        }
    }

    private func opened(_ result: Result<Opened, RedisError>) {
        connecting = false
        let queued = waiting
        waiting = []
        switch result {
        case .success(let opened):
            if hooks.isClosed() {
                for r in queued { r.done(.failure(closedError)) }
                return  // the connection closes as `opened` goes
            }
            backoff.succeeded()
            connection = opened.connection
            fd = opened.connection.fd
            loop.register(fd, self)
            hooks.connected()
            for r in queued { submit(r) }
        case .failure(let error):
            backoff.failed()
            logger.warning("Redis connection failed", metadata: [
                RedisLogKey.endpoint: "\(configuration.redacted)", RedisLogKey.error: "\(error.message)",
            ])
            for r in queued { r.done(.failure(error)) }
        }
    }
}
