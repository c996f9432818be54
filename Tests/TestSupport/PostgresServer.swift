import ClientSupport
import Foundation
import Postgres

/// A throwaway Postgres cluster on 127.0.0.1 with trust auth for user `postgres`, fsync off, its socket
/// in its own temp dir. As root the cluster is owned by and runs as the `postgres` system user.
public final class PostgresServer: Sendable {
    /// The TCP port it listens on.
    public let port: Int
    /// The temp directory: `data/` (the cluster), `postgres.log`, the Unix socket.
    public let directory: String
    private let binDir: String
    private let runAs: [String]
    /// Added to the server's command line (`-c ssl=on …` for a TLS server).
    private let settings: [String]
    private let pidBox: Locked<pid_t?>
    /// Set once started, so an attempt that failed (port taken) does not delete the cluster on its way out.
    private let ownsDirectory = Locked(false)

    private static let sharedServer = Locked<PostgresServer?>(nil)

    /// The server's process id (changes on `restart`); 0 once stopped.
    public var pid: Int32 { pidBox.current ?? 0 }
    /// The log file.
    public var logPath: String { directory + "/postgres.log" }
    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    public var url: String { "postgresql://postgres@127.0.0.1:\(port)/postgres" }

    private init(port: Int, directory: String, binDir: String, runAs: [String], settings: [String]) {
        self.port = port
        self.directory = directory
        self.binDir = binDir
        self.runAs = runAs
        self.settings = settings
        self.pidBox = Locked(nil)
    }

    /// The one server of this test process, started on first use (initdb and startup take seconds) and
    /// stopped at exit. Tests isolate themselves with `createDatabase()`.
    public static func shared() throws -> PostgresServer {
        try sharedServer.withLock { s in
            if let s { return s }
            let server = try start()
            s = server
            return server
        }
    }

    static func stopSharedAtExit() {
        guard let server = sharedServer.current else { return }
        server.stop()
        Spawn.removeDirectory(server.directory)
    }

    deinit {
        stop()
        if ownsDirectory.current { Spawn.removeDirectory(directory) }
    }

    /// Runs initdb in a fresh temp dir and starts a server on a free loopback port; waits until it accepts
    /// connections. With `tls` it also accepts TLS (`ssl = on`, serving those certificates' server pair).
    public static func start(tls: TLSCertificates? = nil) throws -> PostgresServer {
        let bin = try TestEnvironment.requirePostgresBinDir()
        let dir = try Spawn.tempDirectory("tandem-pg")
        var runAs: [String] = []
        if geteuid() == 0 {
            guard let pw = getpwnam("postgres") else {
                throw TestSupportError("running as root but there is no 'postgres' user to own the test cluster — run scripts/bootstrap")
            }
            guard chown(dir, pw.pointee.pw_uid, pw.pointee.pw_gid) == 0 else {
                throw TestSupportError("cannot chown \(dir) to postgres: \(String(cString: strerror(errno)))")
            }
            guard let setpriv = TestEnvironment.which("setpriv") else {
                throw TestSupportError("running as root needs setpriv (util-linux) to run Postgres as 'postgres' — run scripts/bootstrap")
            }
            // setpriv execs in place, so the pid we hold is the postmaster's own.
            runAs = [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        }
        let logPath = dir + "/postgres.log"
        if geteuid() == 0 {
            // The log file must be writable by postgres; create it first and hand it over.
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
            if let pw = getpwnam("postgres") { chown(logPath, pw.pointee.pw_uid, pw.pointee.pw_gid) }
        }
        try Spawn.run(runAs + ["\(bin)/initdb", "-D", dir + "/data", "-U", "postgres", "-A", "trust", "-E", "UTF8",
                               "--locale=C", "--no-sync"],
                      log: logPath, directory: dir)
        var settings: [String] = []
        if let tls {
            // Postgres wants its key readable by its own user only
            for (from, to) in [(tls.serverCert, "server.crt"), (tls.serverKey, "server.key")] {
                let target = dir + "/data/" + to
                try FileManager.default.copyItem(atPath: from, toPath: target)
                chmod(target, 0o600)
                if geteuid() == 0, let pw = getpwnam("postgres") { chown(target, pw.pointee.pw_uid, pw.pointee.pw_gid) }
            }
            settings = ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key"]
        }
        let server = try RedisServer.withFreshPort { port in
            let started = PostgresServer(port: port, directory: dir, binDir: bin, runAs: runAs, settings: settings)
            try started.launch()
            return started
        }
        server.ownsDirectory.withLock { $0 = true }
        return server
    }

    private func launch() throws {
        let argv = runAs + [
            "\(binDir)/postgres", "-D", directory + "/data", "-p", String(port),
            "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=\(directory)",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200", "-c", "shared_buffers=32MB",
        ] + settings
        let pid = try Spawn.start(argv, log: logPath, directory: directory)
        pidBox.withLock { $0 = pid }
        let config = try PostgresConfiguration(url: "host=127.0.0.1 port=\(port) user=postgres dbname=postgres connect_timeout=2")
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            if Spawn.hasExited(pid) {
                pidBox.withLock { $0 = nil }
                throw TestSupportError("postgres on port \(port) exited at startup: \(Spawn.tail(logPath))")
            }
            if PostgresClient.ping(configuration: config) { return }
            usleep(20_000)
        }
        throw TestSupportError("postgres on port \(port) did not accept connections within 60 s: \(Spawn.tail(logPath))")
    }

    /// Creates a fresh database and returns its URL, `postgresql://postgres@127.0.0.1:PORT/t_<random>`.
    public func createDatabase() throws -> String {
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(16).lowercased()
        try Spawn.run(["\(binDir)/createdb", "-h", "127.0.0.1", "-p", String(port), "-U", "postgres", name],
                      log: directory + "/createdb-\(getpid()).log")
        return "postgresql://postgres@127.0.0.1:\(port)/\(name)"
    }

    /// Fast shutdown (SIGINT: disconnects clients), SIGKILL after 10 s. Idempotent.
    public func stop() {
        guard let pid = pidBox.withLock({ p -> pid_t? in defer { p = nil }; return p }) else { return }
        Spawn.stop(pid, signal: SIGINT)
    }

    /// Sends `signal` to the postmaster. SIGKILL simulates a crash: the backends die too (each is in a
    /// session of its own, so a process-group kill would miss them) and this waits until all are gone.
    public func kill(signal: Int32) {
        guard let pid = pidBox.current else { return }
        guard signal == SIGKILL else {
            Glibc.kill(pid, signal)
            return
        }
        let children = Self.childPids(of: pid)
        Glibc.kill(pid, SIGKILL)
        for child in children { Glibc.kill(child, SIGKILL) }
        Spawn.wait(pid)
        pidBox.withLock { $0 = nil }
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, children.contains(where: { Glibc.kill($0, 0) == 0 && !Self.isZombie($0) }) {
            usleep(5_000)
        }
    }

    /// Processes whose parent is `pid`, from /proc.
    static func childPids(of pid: pid_t) -> [pid_t] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { name -> pid_t? in
            guard let child = pid_t(name), let ppid = statField(child, 1) else { return nil }
            return pid_t(ppid) == pid ? child : nil
        }
    }

    static func isZombie(_ pid: pid_t) -> Bool { statField(pid, 0) == "Z" }

    /// Field `index` after the command name in /proc/PID/stat (0 = state, 1 = ppid).
    private static func statField(_ pid: pid_t, _ index: Int) -> String? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > index ? String(fields[index]) : nil
    }

    /// Stops (if running) and starts again on the same port and data directory.
    public func restart() throws {
        if let pid = pidBox.withLock({ p -> pid_t? in defer { p = nil }; return p }) {
            if !Spawn.hasExited(pid) { Spawn.stop(pid, signal: SIGINT) }
        }
        try launch()
    }
}
