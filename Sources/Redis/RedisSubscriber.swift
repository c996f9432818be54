import ClientSupport
import Foundation
import Logging

/// Pub/sub on connections of its own: each `subscribe` call gets a dedicated thread and connection that
/// blocks in a read, reconnects with backoff and subscribes again after a failure.
public final class RedisSubscriber: Sendable {
    private let configuration: RedisConfiguration
    private let logger: Logger
    private let workers = Locked<(closed: Bool, list: [Worker])>((false, []))
    /// Subscribers closed together with this one (the `+switch-master` watcher groups one per sentinel).
    private let children: [RedisSubscriber]

    /// Makes a subscriber; nothing connects until `subscribe`.
    public init(configuration: RedisConfiguration, logger: Logger) {
        var config = configuration
        config.commandTimeout = nil
        self.configuration = config
        self.logger = logger
        self.children = []
    }

    init(children: [RedisSubscriber], configuration: RedisConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        self.children = children
    }

    /// A message as it came off the wire.
    public typealias Message = (channel: String, message: [UInt8], receivedAt: Date)

    /// Subscribes to `channels` and yields every message published on them until the stream is dropped or
    /// `close()` is called. Messages published while reconnecting are lost (pub/sub has no history).
    public func subscribe(channels: [String]) -> AsyncThrowingStream<RedisSubscriber.Message, Error> {
        let (stream, continuation) = AsyncThrowingStream<RedisSubscriber.Message, Error>.makeStream()
        let worker = Worker(configuration: configuration, channels: channels, logger: logger, continuation: continuation)
        let accepted = workers.withLock { state -> Bool in
            if state.closed { return false }
            state.list.append(worker)
            return true
        }
        guard accepted else {
            continuation.finish(throwing: RedisError(code: .closed, message: "Redis subscriber for \(configuration.location) is closed"))
            return stream
        }
        let workers = self.workers
        continuation.onTermination = { _ in
            worker.stop()
            workers.withLock { $0.list.removeAll { $0 === worker } }
        }
        let thread = Thread { worker.run() }
        thread.name = "tandem.redis.subscriber"
        thread.start()
        return stream
    }

    /// Stops every subscription and finishes their streams.
    public func close() {
        let list = workers.withLock { state -> [Worker] in
            state.closed = true
            defer { state.list = [] }
            return state.list
        }
        for w in list { w.stop() }
        for c in children { c.close() }
    }

    private final class Worker: @unchecked Sendable {
        let configuration: RedisConfiguration
        let channels: [String]
        let logger: Logger
        let continuation: AsyncThrowingStream<RedisSubscriber.Message, Error>.Continuation
        /// Stop flag and the socket of the live connection (so `stop` can wake a blocked read).
        let control = Locked<(stopped: Bool, fd: Int32?)>((false, nil))

        init(configuration: RedisConfiguration, channels: [String], logger: Logger,
             continuation: AsyncThrowingStream<RedisSubscriber.Message, Error>.Continuation) {
            self.configuration = configuration
            self.channels = channels
            self.logger = logger
            self.continuation = continuation
        }

        var stopped: Bool { control.current.stopped }

        func stop() {
            control.withLock { c in
                c.stopped = true
                if let fd = c.fd { _ = shutdown(fd, Int32(SHUT_RDWR)) }
            }
        }

        func run() {
            var backoff = Backoff()
            let subscribe = (["SUBSCRIBE"] + channels).argBytes
            while !stopped {
                do throws(RedisError) {
                    let conn = try RedisConnector.establish(configuration, logger: logger)
                    let live = control.withLock { c -> Bool in
                        if c.stopped { return false }
                        c.fd = conn.fd
                        return true
                    }
                    defer { control.withLock { $0.fd = nil } }
                    guard live else { break }
                    _ = try conn.command(subscribe, timeout: nil)
                    backoff.succeeded()
                    while !stopped {
                        let reply = try conn.readReply(during: subscribe, timeout: nil)
                        guard let parts = reply.array, parts.count == 3, parts[0].string == "message",
                              let channel = parts[1].string, let payload = parts[2].bytes else { continue }
                        continuation.yield((channel: channel, message: payload, receivedAt: Date()))
                    }
                } catch {
                    if stopped { break }
                    logger.warning("Redis subscription interrupted; reconnecting", metadata: [
                        RedisLogKey.endpoint: "\(configuration.redacted)", RedisLogKey.error: "\(error.message)",
                    ])
                    backoff.failed()
                    var slept: Duration = .zero
                    while !stopped && slept < Backoff.cap {
                        usleep(20_000)
                        slept += .milliseconds(20)
                        if let notBefore = backoff.notBefore, ContinuousClock.now >= notBefore { break }
                    }
                }
            }
            continuation.finish()
        }
    }
}
