import ClientSupport
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// A TCP proxy on loopback in front of one Postgres or Redis that injects two network faults:
/// - **a lost reply** (`arm()`): the next reply is dropped and both sides closed, so the client sees its connection
///   die without an answer although its write landed. Postgres: the reply that ends with the next ReadyForQuery
///   ('Z', the end of a query or pipeline: the server has committed). Redis: the next reply that starts with
///   `replyPrefix` (e.g. `*1\r\n:1\r\n`, an ack of one job; `*10\r\n`, a claim of one job). One cut per `arm()`.
/// - **a partition** (`partition()` … `heal()`): every byte either way is dropped and new connections are accepted
///   but never answered, so calls hang until the client's own timeouts, as behind a dead link. On `heal()` every
///   connection that lost bytes (or was opened meanwhile) is cut, as TCP would once its retries ran out; new
///   connections go through again.
/// Otherwise bytes pass through untouched.
public final class FaultProxy: @unchecked Sendable {
    /// Which server is behind the proxy, and so which reply is cut.
    public enum Upstream: Sendable {
        case postgres
        case redis(replyPrefix: [UInt8])
    }
    /// The port clients connect to.
    public private(set) var port = 0
    private let upstreamPort: Int
    private let upstream: Upstream
    private let listener: Int32
    private let lock = NSLock()
    private var armed = false
    private var cutCount = 0
    private var acceptCount = 0
    private var stopped = false
    private var open: [Int32] = []
    private var partitioned = false
    /// Sockets whose streams lost bytes during a partition (or that were opened during one): cut on heal.
    private var damaged: Set<Int32> = []

    /// Listens on 127.0.0.1 (a free port) and forwards each connection to 127.0.0.1:`upstreamPort`.
    public init(upstreamPort: Int, upstream: Upstream = .postgres) throws {
        self.upstreamPort = upstreamPort
        self.upstream = upstream
        listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let bound = withLoopbackAddress(port: 0) { bind(listener, $0, $1) }
        guard listener >= 0, bound == 0, listen(listener, 16) == 0 else {
            throw TestSupportError("the fault proxy cannot listen on 127.0.0.1: \(String(cString: strerror(errno)))")
        }
        port = boundPort(listener)
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    /// The next server reply that ends with ReadyForQuery is dropped and its connection cut.
    public func arm() { lock.withLock { armed = true } }

    /// How many replies were dropped so far.
    public var cuts: Int { lock.withLock { cutCount } }

    /// How many connections clients have opened through the proxy so far (during a partition too).
    public var connectionsAccepted: Int { lock.withLock { acceptCount } }

    /// From now on nothing gets through, either way, and new connections hang.
    public func partition() { lock.withLock { partitioned = true } }

    /// Bytes flow again; the connections that lost bytes meanwhile are cut (their clients reconnect).
    public func heal() {
        let cut = lock.withLock { () -> Set<Int32> in
            partitioned = false
            defer { damaged = [] }
            return damaged
        }
        for fd in cut { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Stops listening and closes every connection.
    public func stop() {
        let fds = lock.withLock { () -> [Int32] in
            stopped = true
            return open
        }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        for fd in fds { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                // a client that gave up before being accepted (ECONNABORTED) must not end the proxy
                if lock.withLock({ stopped }) { return }
                continue
            }
            lock.withLock { acceptCount += 1 }
            if lock.withLock({ () -> Bool in
                guard partitioned else { return false }
                open.append(client)
                damaged.insert(client)
                return true
            }) {
                // behind a partition: accepted by the kernel, never answered; drained and dropped until healed
                Thread.detachNewThread { [self] in
                    var sink = [UInt8](repeating: 0, count: 4096)
                    while read(client, &sink, sink.count) > 0 {}
                    lock.withLock {
                        open.removeAll { $0 == client }
                        damaged.remove(client)
                    }
                    close(client)
                }
                continue
            }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let connected = withLoopbackAddress(port: upstreamPort) { connect(server, $0, $1) }
            let keep = lock.withLock { () -> Bool in
                if stopped || connected != 0 { return false }
                open += [client, server]
                return true
            }
            guard keep else {
                close(client)
                close(server)
                continue
            }
            // the second pump to end closes both sockets
            let ends = Locked(0)
            let finish: @Sendable () -> Void = { [self] in
                guard ends.withLock({ $0 += 1; return $0 }) == 2 else { return }
                lock.withLock {
                    open.removeAll { $0 == client || $0 == server }
                    damaged.subtract([client, server])
                }
                close(client)
                close(server)
            }
            Thread.detachNewThread { [self] in
                pump(from: client, to: server, serverSide: false)
                finish()
            }
            Thread.detachNewThread { [self] in
                pump(from: server, to: client, serverSide: true)
                finish()
            }
        }
    }

    /// Copies bytes one way until either side closes. The server side follows the protocol's messages: once the
    /// connection is established (its start-up ended with a ReadyForQuery) and the proxy is armed, whole messages
    /// are held back until the next ReadyForQuery, which ends the reply: then the reply is dropped and both
    /// sockets are shut down. (A connection still starting up is never cut: that would test a failed connect.)
    private func pump(from: Int32, to: Int32, serverSide: Bool) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        var scan: [UInt8] = []  // server bytes whose message boundaries are not yet known
        var established = false
        var sawMessage = false  // before the first message, single 'N'/'S' bytes answer SSL/GSS requests
        var holding = false
        defer {
            shutdown(from, Int32(SHUT_RDWR))
            shutdown(to, Int32(SHUT_RDWR))
        }
        while true {
            let n = read(from, &buffer, buffer.count)
            if n <= 0 { return }
            let chunk = Array(buffer[0..<n])
            let dropped = lock.withLock { () -> Bool in
                guard partitioned else { return false }
                damaged.formUnion([from, to])
                return true
            }
            if dropped { continue }
            if !serverSide {
                if !writeAll(to, chunk) { return }
                continue
            }
            if case .redis(let prefix) = upstream {
                // a reply arrives in one read on loopback (these are small)
                let cut = chunk.starts(with: prefix) && lock.withLock { () -> Bool in
                    guard armed else { return false }
                    armed = false
                    cutCount += 1
                    return true
                }
                if cut { return }
                if !writeAll(to, chunk) { return }
                continue
            }
            if established && !holding && scan.isEmpty { holding = lock.withLock { armed } }
            if !holding && !writeAll(to, chunk) { return }
            scan += chunk
            var i = 0
            var endsReply = false
            while i < scan.count {
                if !sawMessage && (scan[i] == UInt8(ascii: "N") || scan[i] == UInt8(ascii: "S")) {
                    i += 1
                    continue
                }
                guard i + 5 <= scan.count else { break }
                let len = Int(scan[i + 1]) << 24 | Int(scan[i + 2]) << 16 | Int(scan[i + 3]) << 8 | Int(scan[i + 4])
                guard len >= 4, i + 1 + len <= scan.count else { break }
                sawMessage = true
                if scan[i] == UInt8(ascii: "Z") {
                    if holding { endsReply = true }
                    established = true
                }
                i += 1 + len
            }
            scan.removeFirst(i)
            if endsReply {
                lock.withLock {
                    armed = false
                    cutCount += 1
                }
                return  // the held reply is dropped; the defer cuts the connection
            }
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            // MSG_NOSIGNAL: a peer gone meanwhile must end this pump with EPIPE, not the test process with SIGPIPE
            let w = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if w < 0 && errno == EINTR { continue }
            if w <= 0 { return false }
            off += w
        }
        return true
    }
}
