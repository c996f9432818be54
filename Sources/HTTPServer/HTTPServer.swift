#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Logging

/// One parsed HTTP/1.1 request: what a route handler sees.
public struct HTTPRequest: Sendable {
    /// `GET` or `HEAD` (anything else is answered 405 before a handler runs).
    public var method: String
    /// The path without the query string, percent-decoded (`/log/dag_id=x/run_id=y/1.log`).
    public var path: String
    /// Query parameters, percent-decoded; the last value wins for a repeated name.
    public var query: [String: String]
    /// Header fields with lower-cased names (`authorization`, `accept`); the last value wins.
    public var headers: [String: String]
    /// The address of the peer (`127.0.0.1`), for logs.
    public var peer: String

    public init(method: String, path: String, query: [String: String] = [:], headers: [String: String] = [:], peer: String = "") {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.peer = peer
    }
}

/// What a route handler returns. `Content-Length` and `Connection: close` are added by the server.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]

    public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A `text/plain; charset=utf-8` response.
    public static func text(_ s: String, status: Int = 200, contentType: String = "text/plain; charset=utf-8") -> HTTPResponse {
        HTTPResponse(status: status, headers: [("Content-Type", contentType)], body: Array(s.utf8))
    }

    /// The reason phrase for the status codes this server uses.
    public static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 204: "No Content"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 503: "Service Unavailable"
        default: "Status \(status)"
        }
    }
}

/// Why the server could not start, said so a person can act on it.
public struct HTTPServerError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A small HTTP/1.1 server on POSIX sockets for probes, metrics and log serving.
///
/// - Only `GET` and `HEAD`; every response closes the connection (`Connection: close`), so there is no
///   keep-alive state to get wrong.
/// - The request line and headers are read up to 8 KB (431 beyond), with a 5 s read timeout; bodies are ignored.
/// - Accepting runs on a thread of its own; each connection gets a thread, at most `maxConnections` at once
///   (beyond that the connection is answered 503 at once). Handlers run on those threads, never on the Swift
///   concurrency pool, so a slow handler cannot starve the runtime it reports on.
/// - Routes are path prefixes; the longest prefix that matches whole path segments wins (`/log` matches
///   `/log/a/b.log` but not `/logs`). No match: 404.
///
/// ```swift
/// let server = HTTPServer(host: "0.0.0.0", port: 8793, routes: [
///     "/log": { req in req.headers["authorization"] == expected ? .text(read(req.path)) : .text("no", status: 403) },
/// ], logger: logger)
/// try server.start()   // server.port is the bound port (useful with port 0)
/// server.stop()
/// ```
public final class HTTPServer: @unchecked Sendable {
    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse

    /// Largest request head (request line + headers) accepted.
    public static let maxHeadBytes = 8 * 1024

    public let host: String
    private let requestedPort: Int
    private let routes: [(prefix: String, handler: Handler)]
    private let logger: Logger
    private let maxConnections: Int
    private let lock = NSLock()
    private var listenFD: Int32 = -1
    private var boundPort = 0
    private var active = 0
    private var stopped = false
    private var acceptThread: Thread?

    /// - Parameters:
    ///   - host: address to bind (`0.0.0.0` all IPv4, `::` all IPv6, `127.0.0.1` loopback only).
    ///   - port: TCP port; 0 picks a free one (read `port` after `start()`).
    ///   - routes: path prefix → handler.
    ///   - maxConnections: connections served at once.
    public init(host: String = "0.0.0.0", port: Int, routes: [String: Handler], logger: Logger, maxConnections: Int = 16) {
        self.host = host
        self.requestedPort = port
        self.routes = routes.map { ($0.key, $0.value) }.sorted { $0.0.count > $1.0.count }
        self.logger = logger
        self.maxConnections = maxConnections
    }

    /// The port the server listens on (the requested one, or the kernel's pick for port 0); 0 before `start()`.
    public var port: Int { lock.withLock { boundPort } }

    /// Binds and starts accepting. Throws when the address cannot be bound (port in use, bad host).
    public func start() throws {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(requestedPort), &hints, &res)
        guard rc == 0, let ai = res else {
            throw HTTPServerError("cannot listen on \(host):\(requestedPort): \(String(cString: gai_strerror(rc))) (the host must be a numeric address such as 0.0.0.0 or 127.0.0.1)")
        }
        defer { freeaddrinfo(res) }
        let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype, ai.pointee.ai_protocol)
        guard fd >= 0 else { throw HTTPServerError("cannot create a socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw HTTPServerError("cannot listen on \(host):\(requestedPort): \(e) (is another process using the port? pass another port, or 0 to disable)")
        }
        guard listen(fd, 64) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw HTTPServerError("cannot listen on \(host):\(requestedPort): \(e)")
        }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let actual = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int in
                guard getsockname(fd, p, &len) == 0 else { return requestedPort }
                return HTTPServer.port(of: p)
            }
        }
        lock.withLock {
            listenFD = fd
            boundPort = actual
        }
        let t = Thread { [self] in acceptLoop(fd) }
        t.name = "http-accept-\(actual)"
        acceptThread = t
        t.start()
        logger.info("listening on http://\(host):\(actual)", metadata: ["routes": .string(routes.map(\.prefix).joined(separator: ","))])
    }

    /// Stops accepting; connections being served finish on their own.
    public func stop() {
        let fd = lock.withLock { () -> Int32 in
            stopped = true
            let f = listenFD
            listenFD = -1
            return f
        }
        if fd >= 0 {
            shutdown(fd, Int32(SHUT_RDWR))
            close(fd)
        }
    }

    deinit { stop() }

    private static func port(of p: UnsafePointer<sockaddr>) -> Int {
        if p.pointee.sa_family == sa_family_t(AF_INET) {
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
        return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
    }

    private static func address(of p: UnsafePointer<sockaddr>) -> String {
        var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        if p.pointee.sa_family == sa_family_t(AF_INET) {
            p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { s in
                var a = s.pointee.sin_addr
                _ = inet_ntop(AF_INET, &a, &buf, socklen_t(buf.count))
            }
        } else {
            p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { s in
                var a = s.pointee.sin6_addr
                _ = inet_ntop(AF_INET6, &a, &buf, socklen_t(buf.count))
            }
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func acceptLoop(_ fd: Int32) {
        while true {
            var ss = sockaddr_storage()
            var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let c = withUnsafeMutablePointer(to: &ss) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(fd, $0, &len) }
            }
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if lock.withLock({ stopped }) { return }
                if errno == EMFILE || errno == ENFILE {
                    // out of descriptors: back off instead of spinning
                    usleep(100_000)
                    continue
                }
                logger.error("http accept failed: \(String(cString: strerror(errno))); no longer serving")
                return
            }
            let peer = withUnsafePointer(to: &ss) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { HTTPServer.address(of: $0) }
            }
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            #if canImport(Darwin)
            var one: Int32 = 1
            setsockopt(c, SOL_SOCKET, SO_NOSIGPIPE, &one, socklen_t(MemoryLayout<Int32>.size))
            #endif
            let admitted = lock.withLock { () -> Bool in
                guard active < maxConnections else { return false }
                active += 1
                return true
            }
            if !admitted {
                write(c, HTTPServer.encode(.text("busy: too many connections\n", status: 503), head: false))
                close(c)
                continue
            }
            let t = Thread { [self] in
                serve(c, peer: peer)
                close(c)
                lock.withLock { active -= 1 }
            }
            t.name = "http-conn"
            t.start()
        }
    }

    private func serve(_ fd: Int32, peer: String) {
        var buf: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 2048)
        var headEnd: Int?
        while headEnd == nil {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    write(fd, HTTPServer.encode(.text("request head not received in time\n", status: 408), head: false))
                }
                return
            }
            let from = max(0, buf.count - 3)
            buf.append(contentsOf: chunk[0..<n])
            headEnd = HTTPServer.findHeadEnd(buf, from: from)
            if headEnd == nil && buf.count > HTTPServer.maxHeadBytes {
                write(fd, HTTPServer.encode(.text("request head larger than 8 KB\n", status: 431), head: false))
                return
            }
        }
        guard let end = headEnd, end <= HTTPServer.maxHeadBytes else {
            write(fd, HTTPServer.encode(.text("request head larger than 8 KB\n", status: 431), head: false))
            return
        }
        let response: HTTPResponse
        var isHead = false
        switch HTTPServer.parseHead(Array(buf[0..<end]), peer: peer) {
        case .failure(let problem):
            response = .text(problem.message + "\n", status: problem.status)
        case .success(let request):
            isHead = request.method == "HEAD"
            if let route = route(for: request.path) {
                response = route(request)
            } else {
                response = .text("no such path: \(request.path)\n", status: 404)
            }
            logger.debug("\(request.method) \(request.path) \(response.status)", metadata: ["peer": .string(peer)])
        }
        write(fd, HTTPServer.encode(response, head: isHead))
    }

    private func route(for path: String) -> Handler? {
        for r in routes {
            if r.prefix == path { return r.handler }
            if path.hasPrefix(r.prefix) {
                if r.prefix.hasSuffix("/") { return r.handler }
                let next = path[path.index(path.startIndex, offsetBy: r.prefix.count)]
                if next == "/" { return r.handler }
            }
        }
        return nil
    }

    private func write(_ fd: Int32, _ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            #if canImport(Glibc)
            let flags = Int32(MSG_NOSIGNAL)
            #else
            let flags: Int32 = 0
            #endif
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, bytes.count - off, flags) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            off += n
        }
    }

    // MARK: - Pure parsing (unit-tested without sockets)

    /// Index just past the `\r\n\r\n` (or `\n\n`) that ends the head, searching from `from`.
    static func findHeadEnd(_ b: [UInt8], from: Int) -> Int? {
        var i = from
        while i < b.count {
            if b[i] == 0x0A {
                if i + 1 < b.count && b[i + 1] == 0x0A { return i + 2 }
                if i + 2 < b.count && b[i + 1] == 0x0D && b[i + 2] == 0x0A { return i + 3 }
            }
            i += 1
        }
        return nil
    }

    /// A request the server refuses before any handler runs.
    public struct Refusal: Error, Equatable {
        public var status: Int
        public var message: String
    }

    /// Parses a request head (request line and header fields, up to the blank line).
    public static func parseHead(_ head: [UInt8], peer: String = "") -> Result<HTTPRequest, Refusal> {
        guard let text = String(bytes: head, encoding: .utf8) else {
            return .failure(Refusal(status: 400, message: "request head is not UTF-8"))
        }
        // "\r\n" is one Character in Swift, and a newline
        var lines = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).map(String.init)
        while lines.last == "" { lines.removeLast() }
        guard let requestLine = lines.first else { return .failure(Refusal(status: 400, message: "empty request")) }
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else {
            return .failure(Refusal(status: 400, message: "bad request line (expected: GET /path HTTP/1.1)"))
        }
        let method = String(parts[0])
        guard method == "GET" || method == "HEAD" else {
            return .failure(Refusal(status: 405, message: "method \(method) not allowed: only GET and HEAD"))
        }
        var target = String(parts[1])
        if target.hasPrefix("http://") || target.hasPrefix("https://") {
            // absolute form: keep the path
            if let r = target.range(of: "://"), let slash = target[r.upperBound...].firstIndex(of: "/") {
                target = String(target[slash...])
            } else {
                target = "/"
            }
        }
        guard target.hasPrefix("/") else { return .failure(Refusal(status: 400, message: "request target must start with /")) }
        var rawPath = target
        var query: [String: String] = [:]
        if let q = target.firstIndex(of: "?") {
            rawPath = String(target[..<q])
            for pair in target[target.index(after: q)...].split(separator: "&") where !pair.isEmpty {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let k = decode(String(kv[0]), plus: true) ?? String(kv[0])
                let v = kv.count > 1 ? (decode(String(kv[1]), plus: true) ?? String(kv[1])) : ""
                query[k] = v
            }
        }
        guard let path = decode(rawPath, plus: false) else {
            return .failure(Refusal(status: 400, message: "bad percent-encoding in path"))
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else {
                return .failure(Refusal(status: 400, message: "bad header line (no colon)"))
            }
            let name = line[..<colon].trimmingCharacters(in: .whitespaces).lowercased()
            guard !name.isEmpty, !name.contains(" ") else { return .failure(Refusal(status: 400, message: "bad header name")) }
            headers[name] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return .success(HTTPRequest(method: method, path: path, query: query, headers: headers, peer: peer))
    }

    static func decode(_ s: String, plus: Bool) -> String? {
        let s = plus ? s.replacingOccurrences(of: "+", with: " ") : s
        if !s.contains("%") { return s }
        return s.removingPercentEncoding
    }

    /// The bytes of a response: status line, headers, `Content-Length`, `Connection: close`, body (none for HEAD).
    public static func encode(_ r: HTTPResponse, head: Bool) -> [UInt8] {
        var s = "HTTP/1.1 \(r.status) \(reason(r.status))\r\n"
        for (k, v) in r.headers where k.lowercased() != "content-length" && k.lowercased() != "connection" {
            s += "\(k): \(v)\r\n"
        }
        s += "Content-Length: \(r.body.count)\r\nConnection: close\r\n\r\n"
        return Array(s.utf8) + (head ? [] : r.body)
    }

    static func reason(_ status: Int) -> String { HTTPResponse.reason(status) }
}
