import CHiredis
import CRedisTLS
import ClientSupport
import Foundation

/// Owns one `redisContext*`. Not thread-safe: used only by its owner's serial queue or thread.
///
/// Over TLS hiredis still formats commands and parses replies, but the bytes go through `tls` (CRedisTLS) instead
/// of hiredis's own reads and writes; plain connections use hiredis unchanged.
final class RedisConnection {
    private let ctx: UnsafeMutablePointer<redisContext>
    /// The TLS session on hiredis's socket (`rediss://`), or nil.
    private let tls: OpaquePointer?
    /// Where this connection goes, for messages: `127.0.0.1:6390 (db 0)`.
    let location: String

    private init(ctx: UnsafeMutablePointer<redisContext>, tls: OpaquePointer?, location: String) {
        self.ctx = ctx
        self.tls = tls
        self.location = location
    }

    deinit {
        tandem_tls_free(tls)
        redisFree(ctx)
    }

    /// The negotiated TLS version ("TLSv1.3"), or nil for a plain connection.
    var tlsVersion: String? { tls.map { String(cString: tandem_tls_version($0)) } }

    /// The socket, so another thread may `shutdown(2)` it to wake a blocked read; never closed through this.
    var fd: Int32 { tandem_redis_fd(ctx) }

    /// Connects over TCP or a Unix socket; throws `.connectionFailed` with `hint` on failure.
    static func open(
        host: String? = nil,
        port: Int = 0,
        unixPath: String? = nil,
        tls tlsOptions: RedisConfiguration.TLS? = nil,
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
        guard let tlsOptions, let host else { return RedisConnection(ctx: raw, tls: nil, location: location) }
        // the handshake is bounded by the connect timeout, as the TCP connect was
        _ = redisSetTimeout(raw, timeout.timeval)
        var error = [CChar](repeating: 0, count: 256)
        let session = Self.withTLSOptions(tlsOptions) { options in
            tandem_tls_connect(raw, host, options, &error, error.count)
        }
        guard let session else {
            redisFree(raw)
            let cause = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw RedisError(code: .connectionFailed,
                             message: "cannot connect to Redis at \(location) over TLS: \(cause) — \(Self.tlsHint(cause, tlsOptions))",
                             underlying: cause)
        }
        return RedisConnection(ctx: raw, tls: session, location: location)
    }

    private static func withTLSOptions<R>(_ o: RedisConfiguration.TLS, _ body: (UnsafePointer<tandem_tls_options>) -> R) -> R {
        func cString(_ s: String?) -> UnsafeMutablePointer<CChar>? { s.map { strdup($0) } }
        let ca = cString(o.caFile), caPath = cString(o.caPath), cert = cString(o.certFile), key = cString(o.keyFile)
        let password = cString(o.keyPassword)
        defer { free(ca); free(caPath); free(cert); free(key); free(password) }
        var options = tandem_tls_options(verify_peer: o.verifyPeer ? 1 : 0, check_hostname: o.checkHostname ? 1 : 0,
                                         ca_file: ca, ca_path: caPath, cert_file: cert, key_file: key,
                                         key_password: password)
        return body(&options)
    }

    /// What to change when Redis ended the TLS session (an alert), during the handshake or, in TLS 1.3, at the first
    /// read after it; `certificateRequested`: it had asked for a client certificate and none was set.
    private static func refusalHint(_ cause: String, certificateRequested: Bool) -> String {
        certificateRequested || cause.contains("certificate required")
            ? "Redis asked for a client certificate and none is set (tls-auth-clients): set ssl_certfile and ssl_keyfile in the broker URL ([celery] ssl_cert / ssl_key)"
            : "Redis refused the TLS session; if it checks client certificates, check ssl_certfile / ssl_keyfile ([celery] ssl_cert / ssl_key)"
    }

    /// What to change, for the usual ways a TLS connection fails.
    private static func tlsHint(_ cause: String, _ o: RedisConfiguration.TLS) -> String {
        if cause.lowercased().contains("mismatch") {
            return "connect by a name the server's certificate holds, or add ssl_check_hostname=false to the broker URL"
        }
        if cause.contains("not accepted") {
            return o.caFile == nil
                ? "set ssl_ca_certs=/path/to/ca.pem in the broker URL (or [celery] ssl_cacert) to the CA that signed Redis's certificate"
                : "check that \(o.caFile!) holds the CA that signed Redis's certificate (ssl_ca_certs / [celery] ssl_cacert)"
        }
        // our own files (matched by prefix: "the server asked for a client certificate", which CRedisTLS appends to
        // a failed handshake, is not about them)
        if cause.hasPrefix("cannot use the client key") && (cause.contains("bad decrypt") || cause.contains("password")) {
            return o.keyPassword == nil
                ? "the key is encrypted: set ssl_password in the broker URL"
                : "check ssl_password: it does not decrypt the key"
        }
        if cause.hasPrefix("cannot load the client certificate") || cause.hasPrefix("cannot use the client key") {
            return "check ssl_certfile / ssl_keyfile ([celery] ssl_cert / ssl_key)"
        }
        if cause.contains("asked for a client certificate") || cause.contains("certificate required") || cause.contains("alert") {
            return refusalHint(cause, certificateRequested: cause.contains("asked for a client certificate"))
        }
        if cause.contains("no answer") {
            return "is Redis reachable, and is this its tls-port (a plain port does not answer a handshake)?"
        }
        return "is this Redis's tls-port? use redis:// for a plain port"
    }

    /// Sets the reply timeout; nil blocks forever.
    func setTimeout(_ timeout: Duration?) {
        _ = redisSetTimeout(ctx, (timeout ?? .zero).timeval)
    }

    /// Sends one command and reads its reply; an error reply is returned as `.error`, not thrown.
    func command(_ args: [[UInt8]], timeout: Duration?) throws(RedisError) -> RedisValue {
        if tls != nil {
            try append(args)
            return try readReply(during: args, timeout: timeout)
        }
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
        let rc = tls.map { tandem_tls_buffer_write(ctx, $0, &done) } ?? redisBufferWrite(ctx, &done)
        if rc != REDIS_OK { throw failure(during: args, timeout: nil) }
        return done != 0
    }

    /// Reads what has arrived (one read; the loop calls again while the socket stays readable).
    func readAvailable(during args: [[UInt8]]) throws(RedisError) {
        let rc = tls.map { tandem_tls_buffer_read(ctx, $0) } ?? redisBufferRead(ctx)
        if rc != REDIS_OK { throw failure(during: args, timeout: nil) }
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
        let rc = tls.map { tandem_tls_get_reply(ctx, $0, &out) } ?? redisGetReply(ctx, &out)
        if rc != REDIS_OK || out == nil {
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
        let certificateRequested = tls.map { tandem_tls_certificate_requested($0) != 0 } ?? false
        if certificateRequested || (cause.hasPrefix("TLS:") && cause.contains("alert")) {
            // TLS 1.3 refuses a client certificate after the handshake: an alert at the first read, or a reset
            return RedisError(code: .connectionFailed,
                              message: "Redis at \(location) closed the TLS session during \(name): \(cause) — \(Self.refusalHint(cause, certificateRequested: certificateRequested))",
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
