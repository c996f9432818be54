import CHiredis
import ClientSupport
import Foundation

/// Owns one `redisContext*`. Not thread-safe: used only by its owner's serial queue or thread.
final class RedisConnection {
    private let ctx: UnsafeMutablePointer<redisContext>
    /// Where this connection goes, for messages: `127.0.0.1:6390 (db 0)`.
    let location: String

    private init(ctx: UnsafeMutablePointer<redisContext>, location: String) {
        self.ctx = ctx
        self.location = location
    }

    deinit { redisFree(ctx) }

    /// The socket, so another thread may `shutdown(2)` it to wake a blocked read; never closed through this.
    var fd: Int32 { tandem_redis_fd(ctx) }

    /// Connects over TCP or a Unix socket; throws `.connectionFailed` with `hint` on failure.
    static func open(
        host: String? = nil,
        port: Int = 0,
        unixPath: String? = nil,
        timeout: Duration,
        location: String,
        hint: String
    ) throws(RedisError) -> RedisConnection {
        let raw: UnsafeMutablePointer<redisContext>?
        if let unixPath {
            raw = redisConnectUnixWithTimeout(unixPath, timeout.timeval)
        } else {
            raw = redisConnectWithTimeout(host ?? "localhost", Int32(port), timeout.timeval)
        }
        guard let raw else {
            throw RedisError(code: .connectionFailed, message: "cannot connect to Redis at \(location): out of memory",
                             underlying: "redisConnect returned NULL")
        }
        if tandem_redis_err(raw) != 0 {
            let cause = String(cString: tandem_redis_errstr(raw))
            redisFree(raw)
            throw RedisError(
                code: .connectionFailed,
                message: "cannot connect to Redis at \(location): \(cause) — \(hint)",
                underlying: cause
            )
        }
        if unixPath == nil { _ = redisEnableKeepAlive(raw) }
        // hiredis opens its sockets without close-on-exec: no task process the worker starts may hold one
        _ = fcntl(tandem_redis_fd(raw), F_SETFD, FD_CLOEXEC)
        return RedisConnection(ctx: raw, location: location)
    }

    /// Sets the reply timeout; nil blocks forever.
    func setTimeout(_ timeout: Duration?) {
        _ = redisSetTimeout(ctx, (timeout ?? .zero).timeval)
    }

    /// Sends one command and reads its reply; an error reply is returned as `.error`, not thrown.
    func command(_ args: [[UInt8]], timeout: Duration?) throws(RedisError) -> RedisValue {
        let raw = Self.withArgv(args) { argc, argv, lens in redisCommandArgv(ctx, argc, argv, lens) }
        guard let raw else { throw failure(during: args, timeout: timeout) }
        defer { freeReplyObject(raw) }
        return Self.convert(raw.assumingMemoryBound(to: redisReply.self))
    }

    /// Writes all commands at once, then reads one reply per command.
    func pipeline(_ commands: [[[UInt8]]], timeout: Duration?) throws(RedisError) -> [RedisValue] {
        for args in commands {
            let rc = Self.withArgv(args) { argc, argv, lens in redisAppendCommandArgv(ctx, argc, argv, lens) }
            if rc != REDIS_OK { throw failure(during: args, timeout: timeout) }
        }
        var replies: [RedisValue] = []
        replies.reserveCapacity(commands.count)
        for args in commands {
            replies.append(try readReply(during: args, timeout: timeout))
        }
        return replies
    }

    // MARK: Non-blocking use (a connection an `IOLoop` drives; see LoopDrivenRedis)

    /// From now on reads and writes never block; use only `append`, `flush`, `readAvailable` and `nextReply`.
    func makeNonBlocking() throws(RedisError) {
        if tandem_redis_make_nonblocking(ctx) != 0 {
            let cause = String(cString: strerror(tandem_errno()))
            throw RedisError(code: .io, message: "cannot make the connection to Redis at \(location) non-blocking: \(cause)", underlying: cause)
        }
    }

    /// Queues one command in the output buffer (nothing is sent yet).
    func append(_ args: [[UInt8]]) throws(RedisError) {
        let rc = Self.withArgv(args) { argc, argv, lens in redisAppendCommandArgv(ctx, argc, argv, lens) }
        if rc != REDIS_OK { throw failure(during: args, timeout: nil) }
    }

    /// Writes what the socket takes of the output buffer (one write); true once it is all written.
    func flush(during args: [[UInt8]]) throws(RedisError) -> Bool {
        var done: Int32 = 0
        if redisBufferWrite(ctx, &done) != REDIS_OK { throw failure(during: args, timeout: nil) }
        return done != 0
    }

    /// Reads what has arrived (one read; the loop calls again while the socket stays readable).
    func readAvailable(during args: [[UInt8]]) throws(RedisError) {
        if redisBufferRead(ctx) != REDIS_OK { throw failure(during: args, timeout: nil) }
    }

    /// The next complete reply read so far, or nil.
    func nextReply(during args: [[UInt8]]) throws(RedisError) -> RedisValue? {
        var out: UnsafeMutableRawPointer?
        if redisGetReplyFromReader(ctx, &out) != REDIS_OK { throw failure(during: args, timeout: nil) }
        guard let out else { return nil }
        defer { freeReplyObject(out) }
        return Self.convert(out.assumingMemoryBound(to: redisReply.self))
    }

    /// Reads the next reply (for pub/sub or pipelines).
    func readReply(during args: [[UInt8]], timeout: Duration?) throws(RedisError) -> RedisValue {
        var out: UnsafeMutableRawPointer?
        if redisGetReply(ctx, &out) != REDIS_OK || out == nil {
            throw failure(during: args, timeout: timeout)
        }
        defer { freeReplyObject(out) }
        return Self.convert(out!.assumingMemoryBound(to: redisReply.self))
    }

    private func failure(during args: [[UInt8]], timeout: Duration?) -> RedisError {
        let err = tandem_redis_err(ctx)
        let savedErrno = tandem_errno()
        let cause = String(cString: tandem_redis_errstr(ctx))
        let name = args.first.map { String(decoding: $0, as: UTF8.self).uppercased() } ?? "command"
        if err == REDIS_ERR_IO && (savedErrno == EAGAIN || savedErrno == EWOULDBLOCK || cause.contains("temporarily unavailable")) {
            let limit = timeout.map { " within \($0.shortDescription)" } ?? ""
            return RedisError(
                code: .timeout,
                message: "Redis at \(location) did not answer \(name)\(limit) (command timeout); the connection was reset and the next call reconnects",
                underlying: cause
            )
        }
        if err == REDIS_ERR_PROTOCOL {
            return RedisError(code: .protocolError,
                              message: "Redis at \(location) sent a reply that could not be parsed during \(name): \(cause)",
                              underlying: cause)
        }
        return RedisError(
            code: .io,
            message: "lost connection to Redis at \(location) during \(name): \(cause.isEmpty ? "I/O error" : cause) — the next call reconnects",
            underlying: cause
        )
    }

    static func convert(_ r: UnsafePointer<redisReply>) -> RedisValue {
        let reply = r.pointee
        func text() -> [UInt8] {
            guard let str = reply.str, reply.len > 0 else { return [] }
            return str.withMemoryRebound(to: UInt8.self, capacity: reply.len) { Array(UnsafeBufferPointer(start: $0, count: reply.len)) }
        }
        switch reply.type {
        case REDIS_REPLY_STRING: return .bulk(text())
        case REDIS_REPLY_STATUS: return .simpleString(String(decoding: text(), as: UTF8.self))
        case REDIS_REPLY_ERROR: return .error(String(decoding: text(), as: UTF8.self))
        case REDIS_REPLY_INTEGER: return .integer(Int64(reply.integer))
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_ARRAY:
            var items: [RedisValue] = []
            items.reserveCapacity(reply.elements)
            for i in 0..<reply.elements {
                if let e = reply.element[i] { items.append(convert(e)) } else { items.append(.null) }
            }
            return .array(items)
        default:
            return .error("unknown reply type \(reply.type)")
        }
    }

    /// Lays all arguments out in one buffer and hands hiredis pointers plus lengths (binary-safe).
    static func withArgv<R>(
        _ args: [[UInt8]],
        _ body: (Int32, UnsafeMutablePointer<UnsafePointer<CChar>?>, UnsafePointer<Int>) -> R
    ) -> R {
        var flat: [UInt8] = []
        flat.reserveCapacity(args.reduce(1) { $0 + $1.count })
        var offsets: [Int] = []
        var lengths: [Int] = []
        for a in args {
            offsets.append(flat.count)
            lengths.append(a.count)
            flat.append(contentsOf: a)
        }
        flat.append(0)
        return flat.withUnsafeBufferPointer { fb in
            fb.withMemoryRebound(to: CChar.self) { cb in
                let base = cb.baseAddress!
                var pointers: [UnsafePointer<CChar>?] = offsets.map { base + $0 }
                return pointers.withUnsafeMutableBufferPointer { pb in
                    lengths.withUnsafeBufferPointer { lb in
                        body(Int32(args.count), pb.baseAddress!, lb.baseAddress!)
                    }
                }
            }
        }
    }
}

extension Array where Element == String {
    var argBytes: [[UInt8]] { map { [UInt8]($0.utf8) } }
}
