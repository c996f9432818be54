import Dispatch
import ClientSupport
import Foundation
import Logging

/// A Redis connection whose blocking hiredis calls run on its own serial queue, never on the Swift
/// concurrency pool. Commands connect lazily; after an I/O error the next call reconnects (with backoff).
/// Concurrent callers are served in order on the one connection.
public final class RedisClient: Sendable {
    /// What this client connects to.
    public let configuration: RedisConfiguration
    private let logger: Logger
    private let queue: DispatchQueue
    private let core: Core
    private let state = Locked(SharedState())

    private struct SharedState {
        var connected = false
        var closed = false
        /// Set by the `+switch-master` watcher; the next call drops the connection and asks the sentinels.
        var masterSwitched = false
        var watcher: RedisSubscriber?
        var watcherTask: Task<Void, Never>?
    }

    /// State touched only on `queue`.
    private final class Core: @unchecked Sendable {
        var connection: RedisConnection?
        var backoff = Backoff()
    }

    /// Makes a client; nothing connects until `connect()` or the first command.
    public init(configuration: RedisConfiguration, label: String = "redis", logger: Logger) {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: RedisLogKey.label] = "\(label)"
        self.logger = logger
        self.queue = DispatchQueue(label: "tandem.redis.\(label)")
        self.core = Core()
    }

    /// True while a connection is open and has not failed.
    public var isConnected: Bool { state.current.connected }

    /// Connects now so a bad URL, a dead server or a wrong password is reported at startup.
    public func connect() async throws(RedisError) {
        _ = try await run { core throws(RedisError) in _ = try self.connection(core) }
    }

    /// Sends one command; an error reply throws `.server` (`.noScript` for NOSCRIPT).
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        try await send(bytes: args.argBytes)
    }

    /// Sends one binary-safe command; an error reply throws `.server` (`.noScript` for NOSCRIPT).
    public func send(bytes args: [[UInt8]]) async throws(RedisError) -> RedisValue {
        try await run { core throws(RedisError) in
            let reply = try self.execute(core, args)
            if case .error(let e) = reply { throw self.serverError(e, args: args) }
            return reply
        }
    }

    /// Writes all commands in one go and reads one reply per command; error replies stay in the array.
    public func pipeline(_ commands: [[String]]) async throws(RedisError) -> [RedisValue] {
        let encoded = commands.map(\.argBytes)
        return try await run { core throws(RedisError) in try self.executePipeline(core, encoded) }
    }

    /// Runs a script by SHA; if the server does not have it, loads it and retries once.
    public func eval(_ script: RedisScript, keys: [String], args: [String]) async throws(RedisError) -> RedisValue {
        try await run { core throws(RedisError) in
            let call = Self.evalArgs(script, keys: keys, args: args)
            var reply = try self.execute(core, call)
            if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
                try self.load(core, [script])
                reply = try self.execute(core, call)
            }
            if case .error(let e) = reply { throw self.serverError(e, args: call, script: script) }
            return reply
        }
    }

    /// Runs several scripts in one pipeline (e.g. lease renewals); NOSCRIPT ones are loaded and re-run once.
    /// Other error replies stay in the array as `.error`.
    public func evalPipeline(_ calls: [(RedisScript, keys: [String], args: [String])]) async throws(RedisError) -> [RedisValue] {
        let encoded = calls.map { Self.evalArgs($0.0, keys: $0.keys, args: $0.args) }
        let scripts = calls.map(\.0)
        return try await run { core throws(RedisError) in
            var replies = try self.executePipeline(core, encoded)
            let missing = replies.indices.filter {
                if case .error(let e) = replies[$0] { return e.hasPrefix("NOSCRIPT") }
                return false
            }
            if missing.isEmpty { return replies }
            var seen = Set<String>()
            let toLoad = missing.map { scripts[$0] }.filter { seen.insert($0.sha1).inserted }
            try self.load(core, toLoad)
            let again = try self.executePipeline(core, missing.map { encoded[$0] })
            for (i, index) in missing.enumerated() { replies[index] = again[i] }
            return replies
        }
    }

    /// The server's clock (`TIME`); Tandem's one clock for leases and heartbeats.
    public func time() async throws(RedisError) -> RedisTime {
        let reply = try await send(["TIME"])
        guard let parts = reply.array, parts.count == 2, let s = parts[0].int, let us = parts[1].int else {
            throw RedisError(code: .protocolError, message: "Redis at \(configuration.location) answered TIME with \(reply)")
        }
        return RedisTime(seconds: s, microseconds: us)
    }

    /// Closes the connection; later calls throw `.closed`.
    public func close() {
        let wasClosed = state.withLock { s -> Bool in
            defer { s.closed = true; s.connected = false }
            return s.closed
        }
        guard !wasClosed else { return }
        stopWatcher()
        let core = self.core
        queue.async { core.connection = nil }
    }

    deinit { stopWatcher() }

    private func stopWatcher() {
        let (watcher, task) = state.withLock { s in
            defer { s.watcher = nil; s.watcherTask = nil }
            return (s.watcher, s.watcherTask)
        }
        watcher?.close()
        task?.cancel()
    }

    /// Subscribes to `+switch-master` on each sentinel, once, after the first successful connection.
    private func startWatcherIfNeeded() {
        guard configuration.followSwitchMaster,
              case .sentinel(let nodes, let master, let sentinelPassword) = configuration.endpoint else { return }
        let needed = state.withLock { s -> Bool in !s.closed && s.watcher == nil }
        guard needed else { return }
        var subscribers: [RedisSubscriber] = []
        for node in nodes {
            var c = RedisConfiguration(endpoint: .tcp(host: node.host, port: node.port), password: sentinelPassword)
            c.connectTimeout = configuration.connectTimeout
            c.connectHint = "is redis-sentinel running?"
            subscribers.append(RedisSubscriber(configuration: c, logger: logger))
        }
        let group = RedisSubscriber(children: subscribers, configuration: configuration, logger: logger)
        let streams = subscribers.map { $0.subscribe(channels: ["+switch-master"]) }
        let state = self.state
        let logger = self.logger
        let prefix = Array((master + " ").utf8)
        let task = Task.detached {
            await withTaskGroup(of: Void.self) { tasks in
                for stream in streams {
                    tasks.addTask {
                        do {
                            for try await event in stream where event.message.starts(with: prefix) {
                                logger.info("Sentinel announced a new master; reconnecting on next call",
                                            metadata: [RedisLogKey.master: "\(String(decoding: event.message, as: UTF8.self))"])
                                state.withLock { $0.masterSwitched = true }
                            }
                        } catch {}
                    }
                }
            }
        }
        let installed = state.withLock { s -> Bool in
            guard !s.closed, s.watcher == nil else { return false }
            s.watcher = group
            s.watcherTask = task
            return true
        }
        if !installed {
            group.close()
            task.cancel()
        }
    }

    // MARK: - On the queue

    private func run<T: Sendable>(_ body: @escaping @Sendable (Core) throws(RedisError) -> T) async throws(RedisError) -> T {
        let core = self.core
        let result: Result<T, RedisError> = await withCheckedContinuation { continuation in
            queue.async {
                do throws(RedisError) {
                    continuation.resume(returning: .success(try body(core)))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }

    private func connection(_ core: Core) throws(RedisError) -> RedisConnection {
        if state.current.closed {
            core.connection = nil
            throw RedisError(code: .closed, message: "Redis client for \(configuration.location) is closed")
        }
        if state.withLock({ s -> Bool in defer { s.masterSwitched = false }; return s.masterSwitched }),
           core.connection != nil {
            core.connection = nil
            state.withLock { $0.connected = false }
        }
        if let c = core.connection { return c }
        core.backoff.wait(limit: configuration.connectTimeout)
        do {
            let c = try RedisConnector.establish(configuration, logger: logger)
            core.connection = c
            core.backoff.succeeded()
            ConnectionStats.redisConnects.withLock { $0 += 1 }
            state.withLock { $0.connected = true }
            startWatcherIfNeeded()
            return c
        } catch {
            core.backoff.failed()
            logger.warning("Redis connection failed", metadata: [
                RedisLogKey.endpoint: "\(configuration.redacted)", RedisLogKey.error: "\(error.message)",
            ])
            throw error
        }
    }

    private func broken(_ core: Core, _ error: RedisError) {
        core.connection = nil
        core.backoff.failed()
        state.withLock { $0.connected = false }
        logger.warning("Redis connection lost", metadata: [
            RedisLogKey.endpoint: "\(configuration.redacted)", RedisLogKey.error: "\(error.message)",
        ])
    }

    private func execute(_ core: Core, _ args: [[UInt8]]) throws(RedisError) -> RedisValue {
        let conn = try connection(core)
        do {
            let reply = try conn.command(args, timeout: configuration.commandTimeout)
            dropIfReadOnly(core, reply)
            return reply
        } catch {
            broken(core, error)
            throw error
        }
    }

    private func executePipeline(_ core: Core, _ commands: [[[UInt8]]]) throws(RedisError) -> [RedisValue] {
        if commands.isEmpty { return [] }
        let conn = try connection(core)
        do {
            let replies = try conn.pipeline(commands, timeout: configuration.commandTimeout)
            for r in replies { dropIfReadOnly(core, r) }
            return replies
        } catch {
            broken(core, error)
            throw error
        }
    }

    /// A READONLY reply means we are talking to a demoted master: drop the connection so the next call
    /// resolves (via Sentinel) the new one.
    private func dropIfReadOnly(_ core: Core, _ reply: RedisValue) {
        if case .error(let e) = reply, e.hasPrefix("READONLY"), core.connection != nil {
            core.connection = nil
            state.withLock { $0.connected = false }
            logger.warning("Redis answered READONLY; reconnecting on next call",
                           metadata: [RedisLogKey.endpoint: "\(configuration.redacted)"])
        }
    }

    private func load(_ core: Core, _ scripts: [RedisScript]) throws(RedisError) {
        let replies = try executePipeline(core, scripts.map { ["SCRIPT", "LOAD", $0.source].argBytes })
        for (script, reply) in zip(scripts, replies) {
            if case .error(let e) = reply {
                throw RedisError(code: .server,
                                 message: "Redis at \(configuration.location) refused to load script '\(script.name)': \(e)",
                                 underlying: e)
            }
        }
    }

    private static func evalArgs(_ script: RedisScript, keys: [String], args: [String]) -> [[UInt8]] {
        (["EVALSHA", script.sha1, String(keys.count)] + keys + args).argBytes
    }

    private func serverError(_ e: String, args: [[UInt8]], script: RedisScript? = nil) -> RedisError {
        let name = script.map { "script '\($0.name)'" }
            ?? args.first.map { String(decoding: $0, as: UTF8.self).uppercased() } ?? "command"
        return RedisError(
            code: e.hasPrefix("NOSCRIPT") ? .noScript : .server,
            message: "Redis at \(configuration.location) answered \(name) with an error: \(e)",
            underlying: e
        )
    }
}
