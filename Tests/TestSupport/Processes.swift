import ClientSupport
import CSpawn
import Foundation

/// A failure to start or drive a throwaway server; the message says what to do.
public struct TestSupportError: Error, CustomStringConvertible {
    /// What went wrong and what to run.
    public var message: String
    /// Makes an error.
    public init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}

/// Finds the server binaries the integration tests need. A missing binary is a test failure that says
/// "run scripts/bootstrap", never a silent skip.
public enum TestEnvironment {
    /// A fresh private directory under the system temp dir (mkdtemp), for a test's own files.
    public static func freshDirectory(_ prefix: String) throws -> String { try Spawn.tempDirectory(prefix) }

    /// `redis-server`, from `TANDEM_REDIS_SERVER` or the PATH.
    public static var redisServerPath: String? {
        if let p = ProcessInfo.processInfo.environment["TANDEM_REDIS_SERVER"], isExecutable(p) { return p }
        return which("redis-server")
    }

    /// The directory holding `initdb`, `postgres` and `createdb`: `TANDEM_PG_BIN`, then
    /// `/usr/lib/postgresql/<newest>/bin`, then the PATH.
    public static var postgresBinDir: String? {
        if let p = ProcessInfo.processInfo.environment["TANDEM_PG_BIN"], isExecutable(p + "/initdb") { return p }
        let root = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [])
            .compactMap { Int($0) }.sorted(by: >)
        for v in versions where isExecutable("\(root)/\(v)/bin/initdb") { return "\(root)/\(v)/bin" }
        if let initdb = which("initdb") { return (initdb as NSString).deletingLastPathComponent }
        return nil
    }

    /// `redis-server`, or an error telling the reader to run scripts/bootstrap.
    public static func requireRedisServer() throws -> String {
        guard let p = redisServerPath else {
            throw TestSupportError("redis-server not found on PATH (or TANDEM_REDIS_SERVER) — run scripts/bootstrap")
        }
        return p
    }

    /// The Postgres bin directory, or an error telling the reader to run scripts/bootstrap.
    public static func requirePostgresBinDir() throws -> String {
        guard let p = postgresBinDir else {
            throw TestSupportError("Postgres server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin, TANDEM_PG_BIN or PATH — run scripts/bootstrap")
        }
        return p
    }

    static func isExecutable(_ path: String) -> Bool { access(path, X_OK) == 0 }

    /// Prometheus's `promtool` (Debian package prometheus), for the alert rules' unit tests.
    public static func requirePromtool() throws -> String {
        guard let p = which("promtool") else {
            throw TestSupportError("promtool not found on PATH — run scripts/bootstrap (Debian package prometheus)")
        }
        return p
    }

    static func which(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in (path + ":/usr/sbin:/sbin").split(separator: ":") where isExecutable("\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }
}

/// Ports this process already handed out, so two servers started in parallel never get the same one.
private let handedOutPorts = Locked<Set<Int>>([])

/// A TCP port on 127.0.0.1 that nothing listens on right now. Picked below Linux's ephemeral range
/// (32768+) so client sockets cannot take it before the server binds; never the same port twice per process.
public func freeLoopbackPort() -> Int {
    for _ in 0..<500 {
        let port = Int.random(in: 15_000..<32_000)
        let fresh = handedOutPorts.withLock { $0.insert(port).inserted }
        if fresh && canBindLoopback(port) { return port }
    }
    return kernelPickedPort()
}

func canBindLoopback(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    return withLoopbackAddress(port: port) { bind(fd, $0, $1) } == 0
}

/// Calls `body` with the socket address 127.0.0.1:`port` and its length (port 0: the kernel picks one on bind).
func withLoopbackAddress<R>(port: Int, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = UInt16(port).bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}

/// The local port socket `fd` is bound to.
func boundPort(_ fd: Int32) -> Int {
    var addr = sockaddr_in()
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
    }
    return Int(UInt16(bigEndian: addr.sin_port))
}

private func kernelPickedPort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    precondition(fd >= 0, "socket() failed")
    defer { close(fd) }
    precondition(withLoopbackAddress(port: 0) { bind(fd, $0, $1) } == 0, "bind(127.0.0.1:0) failed")
    return boundPort(fd)
}

/// Runs blocking work (starting or stopping a server, initdb) on a thread of its own and awaits it, so
/// async tests do not tie up the Swift concurrency pool (2 threads on a 2-core machine).
public func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        thread.start()
    }
}

/// Child processes started by this module, killed at exit so no server outlives the test run.
enum ChildRegistry {
    static let pids = Locked<Set<pid_t>>([])
    static let installed = Locked(false)

    static func add(_ pid: pid_t) {
        pids.withLock { _ = $0.insert(pid) }
        let first = installed.withLock { i -> Bool in
            defer { i = true }
            return !i
        }
        if first {
            atexit {
                PostgresServer.stopSharedAtExit()
                for pid in ChildRegistry.pids.current { kill(pid, SIGKILL) }
            }
        }
    }

    static func remove(_ pid: pid_t) { pids.withLock { _ = $0.remove(pid) } }
}

enum Spawn {
    /// Starts `argv` (no shell) with stdin from /dev/null and stdout+stderr appended to `log`.
    static func start(_ argv: [String], log: String, directory: String? = nil) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // nothing else of the test process: a socket another test opened a moment ago (before it could mark it
        // close-on-exec) would otherwise stay open in this server for its whole life — a Redis client that test
        // dropped then still showed in CLIENT LIST (droppedLoopClientClosesItsConnection failed that way)
        _ = tandem_spawn_actions_close_from(&actions, 3)
        _ = directory  // cwd is inherited; every path we pass is absolute
        // Threads of Dispatch and the test runner block signals, and a child inherits its spawner's mask:
        // unblock everything and reset handlers so SIGTERM/SIGINT really stop the server.
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        // A process group of its own, so a simulated crash can SIGKILL a server and all its children at once.
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        let cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, cargs, environ)
        guard rc == 0 else {
            throw TestSupportError("cannot start \(argv[0]): \(String(cString: strerror(rc))) — run scripts/bootstrap")
        }
        ChildRegistry.add(pid)
        return pid
    }

    /// Runs `argv` to completion; throws with the log's tail if it fails.
    static func run(_ argv: [String], log: String, directory: String? = nil) throws {
        let pid = try start(argv, log: log, directory: directory)
        let status = wait(pid)
        guard status == 0 else {
            throw TestSupportError("\(argv.joined(separator: " ")) exited with status \(status): \(tail(log))")
        }
    }

    /// Waits for `pid` to exit and returns its exit code (128+signal when killed).
    @discardableResult
    static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        ChildRegistry.remove(pid)
        return exitCode(status)
    }

    /// True if `pid` has exited (and reaps it).
    static func hasExited(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid || (r < 0 && errno == ECHILD) {
            ChildRegistry.remove(pid)
            return true
        }
        return false
    }

    /// Sends `signal`, waits up to `timeout`, then SIGKILLs.
    static func stop(_ pid: pid_t, signal: Int32, timeout: TimeInterval = 10) {
        kill(pid, signal)
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if hasExited(pid) { return }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        wait(pid)
    }

    static func exitCode(_ status: Int32) -> Int32 {
        let sig = status & 0x7f
        return sig == 0 ? (status >> 8) & 0xff : 128 + sig
    }

    static func tail(_ path: String, lines: Int = 15) -> String {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "(no log at \(path))" }
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    /// Removes a server's temp dir, unless TANDEM_KEEP_TEST_DIRS=1 asks to keep them for a post-mortem.
    static func removeDirectory(_ path: String) {
        guard ProcessInfo.processInfo.environment["TANDEM_KEEP_TEST_DIRS"] != "1" else { return }
        try? FileManager.default.removeItem(atPath: path)
    }

    /// A fresh private directory under the system temp dir.
    static func tempDirectory(_ prefix: String) throws -> String {
        var template = Array((NSTemporaryDirectory() + "/\(prefix)-XXXXXX").utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw TestSupportError("cannot create a temp directory: \(String(cString: strerror(errno)))")
        }
        return String(cString: p)
    }
}
