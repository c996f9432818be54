import Dispatch
import ClientSupport
import Foundation
import Logging

/// A Redis connection. Given an `IOLoop`, the loop drives its socket (`LoopDrivenRedis`: no thread of its own,
/// several calls in flight at once); otherwise its blocking hiredis calls run on its own serial queue, never on
/// the Swift concurrency pool, and concurrent callers are served in order. Either way commands connect lazily
/// and after an I/O error the next call reconnects (with backoff).
public final class RedisClient: Sendable {
    /// What this client connects to.
    public let configuration: RedisConfiguration
    private let logger: Logger
    private let queue: DispatchQueue
    private let core: Core
    private let state = Locked(SharedState())
    private let driven: LoopDrivenRedis?

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

    /// Makes a client; nothing connects until `connect()` or the first command. With `loop`, the loop drives the
    /// connection.
    public init(configuration: RedisConfiguration, label: String = "redis", logger: Logger, loop: (any IOLoop)? = nil) {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: RedisLogKey.label] = "\(label)"
        self.logger = logger
        self.queue = DispatchQueue(label: "tandem.redis.\(label)")
        self.core = Core()
        guard let loop else {
            driven = nil
            return
        }
        let state = self.state
        driven = LoopDrivenRedis(
            loop: loop, configuration: configuration, label: label, logger: logger,
            hooks: .init(
                connected: {
                    ConnectionStats.redisConnects.withLock { $0 += 1 }
                    state.withLock { $0.connected = true }
                },
                lost: { state.withLock { $0.connected = false } },
                isClosed: { state.current.closed },
                takeMasterSwitch: { state.withLock { s in defer { s.masterSwitched = false }; return s.masterSwitched } }))
    }

    /// True while a connection is open and has not failed.
    public var isConnected: Bool { state.current.connected }

    /// Connects now so a bad URL, a dead server or a wrong password is reported at startup.
    public func connect() async throws(RedisError) {
        if let driven {
            _ = try await driven.exchange([])
            return
        }
        _ = try await run { core throws(RedisError) in _ = try self.connection(core) }
    }

    /// Sends one command; an error reply throws `.server` (`.noScript` for NOSCRIPT).
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        try await send(bytes: args.argBytes)
    }

    /// Sends one binary-safe command; an error reply throws `.server` (`.noScript` for NOSCRIPT).
    public func send(bytes args: [[UInt8]]) async throws(RedisError) -> RedisValue {
        let reply = try await exchange([args])[0]
        if case .error(let e) = reply { throw serverError(e, args: args) }
        return reply
    }

    /// Writes all commands in one go and reads one reply per command; error replies stay in the array.
    public func pipeline(_ commands: [[String]]) async throws(RedisError) -> [RedisValue] {
        try await exchange(commands.map(\.argBytes))
    }

    /// Runs a script by SHA; if the server does not have it, loads it and retries once.
    public func eval(_ script: RedisScript, keys: [String], args: [String]) async throws(RedisError) -> RedisValue {
        let reply = try await evalPipeline([(script, keys: keys, args: args)])[0]
        if case .error(let e) = reply { throw serverError(e, args: [], script: script) }
        return reply
    }

    /// Runs several scripts in one pipeline (e.g. lease renewals); NOSCRIPT ones are loaded and re-run once.
    /// Other error replies stay in the array as `.error`.
    public func evalPipeline(_ calls: [(RedisScript, keys: [String], args: [String])]) async throws(RedisError) -> [RedisValue] {
        let encoded = calls.map { Self.evalArgs($0.0, keys: $0.keys, args: $0.args) }
        var replies = try await exchange(encoded)
        let missing = replies.indices.filter {
            if case .error(let e) = replies[$0] { return e.hasPrefix("NOSCRIPT") }
            return false
        }
        if missing.isEmpty { return replies }
        var seen = Set<String>()
        try await load(missing.map { calls[$0].0 }.filter { seen.insert($0.sha1).inserted })
        let again = try await exchange(missing.map { encoded[$0] })
        for (i, index) in missing.enumerated() { replies[index] = again[i] }
        return replies
    }

    /// Sends the commands in one write and returns one reply per command, error replies included.
    private func exchange(_ commands: [[[UInt8]]]) async throws(RedisError) -> [RedisValue] {
        if let driven {
            let replies = try await driven.exchange(commands)
            startWatcherIfNeeded()  // (returns at once unless Sentinel is followed and no watcher runs yet)
            return replies
        }
        return try await run { core throws(RedisError) in try self.executePipeline(core, commands) }
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
        driven?.close()
        let core = self.core
        queue.async { core.connection = nil }
    }

    deinit {
        stopWatcher()
        // a loop-driven connection is held by its loop until dropped: without this an unclosed client's socket
        // would stay open and registered for the life of the process
        driven?.close()
    }

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

    private func load(_ scripts: [RedisScript]) async throws(RedisError) {
        let replies = try await exchange(scripts.map { ["SCRIPT", "LOAD", $0.source].argBytes })
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
