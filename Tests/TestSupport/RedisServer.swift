import ClientSupport
import Foundation

/// A throwaway `redis-server` (or Sentinel) on 127.0.0.1, a free port and a temp dir of its own; killed
/// when dropped and at process exit.
public final class RedisServer: Sendable {
    /// The TCP port it listens on.
    public let port: Int
    /// Its working directory (config, log, any dump files).
    public let directory: String
    /// The password set with `requirepass`, if any.
    public let password: String?
    /// The TLS port, when started with `startTLS` (`port` then stays plain, for the readiness check).
    public let tlsPort: Int?
    private let argv: [String]
    private let pidBox: Locked<pid_t?>
    /// Set once started, so an attempt that failed (port taken) does not delete the dir the retry uses.
    private let ownsDirectory = Locked(false)

    /// `redis://[:password@]127.0.0.1:PORT/0`.
    public var url: String {
        let auth = password.map { ":\($0.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? $0)@" } ?? ""
        return "redis://\(auth)127.0.0.1:\(port)/0"
    }

    /// The server's process id (changes on `restart`); 0 once stopped.
    public var pid: Int32 { pidBox.current ?? 0 }

    /// The log file (stdout and stderr).
    public var logPath: String { directory + "/redis.log" }

    private init(port: Int, directory: String, password: String?, argv: [String], tlsPort: Int? = nil) {
        self.port = port
        self.tlsPort = tlsPort
        self.directory = directory
        self.password = password
        self.argv = argv
        self.pidBox = Locked(nil)
    }

    deinit {
        stop()
        if ownsDirectory.current { Spawn.removeDirectory(directory) }
    }

    /// Starts redis-server with `--save '' --appendonly no` (unless `extraArguments` override them, which
    /// come last) and waits until it answers PING.
    public static func start(extraArguments: [String] = [], password: String? = nil) throws -> RedisServer {
        let binary = try TestEnvironment.requireRedisServer()
        let dir = try Spawn.tempDirectory("tandem-redis")
        return try withFreshPort { port in
            var argv = [binary, "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--daemonize", "no",
                        "--save", "", "--appendonly", "no", "--protected-mode", "no"]
            if let password { argv += ["--requirepass", password] }
            argv += extraArguments
            let server = RedisServer(port: port, directory: dir, password: password, argv: argv)
            try server.launch()
            server.ownsDirectory.withLock { $0 = true }
            return server
        }
    }

    /// `rediss://127.0.0.1:TLSPORT/0` trusting `certificates`' CA, plus `query` (`&`-joined parameters).
    public func tlsURL(_ certificates: TLSCertificates, query: String = "") -> String {
        "rediss://127.0.0.1:\(tlsPort ?? 0)/0?ssl_cert_reqs=required&ssl_ca_certs=\(certificates.caFile)"
            + (query.isEmpty ? "" : "&" + query)
    }

    /// Starts redis-server with a TLS port (`tlsPort`) beside its plain one, serving `certificates`' server
    /// certificate; `requireClientCertificates` sets `tls-auth-clients yes` (else `no`).
    public static func startTLS(_ certificates: TLSCertificates, requireClientCertificates: Bool = false) throws -> RedisServer {
        let binary = try TestEnvironment.requireRedisServer()
        let dir = try Spawn.tempDirectory("tandem-redis-tls")
        return try withFreshPort { port in
            let tlsPort = freeLoopbackPort()
            let argv = [binary, "--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--daemonize", "no",
                        "--save", "", "--appendonly", "no", "--protected-mode", "no",
                        "--tls-port", String(tlsPort), "--tls-cert-file", certificates.serverCert,
                        "--tls-key-file", certificates.serverKey, "--tls-ca-cert-file", certificates.caFile,
                        "--tls-auth-clients", requireClientCertificates ? "yes" : "no"]
            let server = RedisServer(port: port, directory: dir, password: nil, argv: argv, tlsPort: tlsPort)
            try server.launch()
            server.ownsDirectory.withLock { $0 = true }
            return server
        }
    }

    /// Retries with another port when the one picked was taken between picking and binding.
    static func withFreshPort<T>(_ body: (Int) throws -> T) throws -> T {
        var attempt = 0
        while true {
            do {
                return try body(freeLoopbackPort())
            } catch let error as TestSupportError where error.message.contains("Address already in use") && attempt < 5 {
                attempt += 1
            }
        }
    }

    /// Starts a Sentinel (`redis-server sentinel.conf --sentinel`) that monitors the master on
    /// 127.0.0.1:`masterPort` under `masterName`, with a 1 s down-after and failover timeouts fit for tests.
    /// `masterPassword` is what the master requires (`sentinel auth-pass`); `sentinelPassword` is the
    /// Sentinel's own `requirepass`.
    /// With `tls` the sentinel reaches the master over TLS (`tls-replication yes`; `masterPort` is then the
    /// master's TLS port, which is what it hands clients) while listening plain itself.
    public static func startSentinel(masterPort: Int, masterName: String, quorum: Int = 2,
                                     masterPassword: String? = nil, sentinelPassword: String? = nil,
                                     tls: TLSCertificates? = nil) throws -> RedisServer {
        let binary = try TestEnvironment.requireRedisServer()
        let dir = try Spawn.tempDirectory("tandem-sentinel")
        return try withFreshPort { port in try sentinel(binary: binary, dir: dir, port: port, masterPort: masterPort,
                                                        masterName: masterName, quorum: quorum,
                                                        masterPassword: masterPassword,
                                                        sentinelPassword: sentinelPassword, tls: tls) }
    }

    private static func sentinel(binary: String, dir: String, port: Int, masterPort: Int, masterName: String,
                                 quorum: Int, masterPassword: String?, sentinelPassword: String?,
                                 tls: TLSCertificates?) throws -> RedisServer {
        var conf = """
            port \(port)
            bind 127.0.0.1
            dir \(dir)
            protected-mode no
            sentinel monitor \(masterName) 127.0.0.1 \(masterPort) \(quorum)
            sentinel down-after-milliseconds \(masterName) 1000
            sentinel failover-timeout \(masterName) 5000
            sentinel parallel-syncs \(masterName) 1

            """
        if let masterPassword { conf += "sentinel auth-pass \(masterName) \(masterPassword)\n" }
        if let sentinelPassword { conf += "requirepass \(sentinelPassword)\n" }
        if let tls {
            conf += "tls-replication yes\ntls-cert-file \(tls.serverCert)\ntls-key-file \(tls.serverKey)\n"
            conf += "tls-ca-cert-file \(tls.caFile)\n"
        }
        let confPath = dir + "/sentinel.conf"
        try conf.write(toFile: confPath, atomically: true, encoding: .utf8)
        let server = RedisServer(port: port, directory: dir, password: nil, argv: [binary, confPath, "--sentinel"])
        try server.launch()
        server.ownsDirectory.withLock { $0 = true }
        return server
    }

    private func launch() throws {
        let pid = try Spawn.start(argv, log: logPath, directory: directory)
        pidBox.withLock { $0 = pid }
        let deadline = Date().addingTimeInterval(15)
        while Date() < deadline {
            if Spawn.hasExited(pid) {
                pidBox.withLock { $0 = nil }
                throw TestSupportError("redis-server on port \(port) exited at startup: \(Spawn.tail(logPath))")
            }
            if Self.answersPing(port: port) { return }
            usleep(10_000)
        }
        throw TestSupportError("redis-server on port \(port) did not answer PING within 15 s: \(Spawn.tail(logPath))")
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s). Idempotent.
    public func stop() {
        guard let pid = pidBox.withLock({ p -> pid_t? in defer { p = nil }; return p }) else { return }
        Spawn.stop(pid, signal: SIGTERM)
    }

    /// Sends `signal`; for SIGKILL also waits for the process to be gone.
    public func kill(signal: Int32) {
        guard let pid = pidBox.current else { return }
        Glibc.kill(pid, signal)
        if signal == SIGKILL {
            Spawn.wait(pid)
            pidBox.withLock { $0 = nil }
        }
    }

    /// Stops (if running) and starts again on the same port and directory with the same arguments.
    public func restart() throws {
        if let pid = pidBox.withLock({ p -> pid_t? in defer { p = nil }; return p }) {
            if !Spawn.hasExited(pid) { Spawn.stop(pid, signal: SIGTERM) }
        }
        try launch()
    }

    /// True if something on 127.0.0.1:`port` answers a Redis PING (NOAUTH counts: the server is up).
    static func answersPing(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard withLoopbackAddress(port: port, { connect(fd, $0, $1) }) == 0 else { return false }
        let ping = Array("PING\r\n".utf8)
        guard write(fd, ping, ping.count) == ping.count else { return false }
        var buf = [UInt8](repeating: 0, count: 64)
        let n = read(fd, &buf, buf.count)
        guard n > 0 else { return false }
        let reply = String(decoding: buf[0..<n], as: UTF8.self)
        return reply.hasPrefix("+PONG") || reply.hasPrefix("-NOAUTH") || reply.contains("AUTH")
    }
}
