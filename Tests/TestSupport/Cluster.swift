import Foundation

/// Paths inside the repository, found from this file's location.
public enum Repo {
    public static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    public static let fakeAirflow = root + "/Tests/Fixtures/bin/airflow"
    /// Where `swift build` put the executables: TANDEM_BIN_DIR, else next to the test bundle.
    public static var binDir: String {
        if let d = ProcessInfo.processInfo.environment["TANDEM_BIN_DIR"] { return d }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        // swift test runs <bin>/TandemPackageTests.xctest
        if dir.lastPathComponent.hasSuffix(".xctest") { dir = dir.deletingLastPathComponent() }
        return dir.path
    }
    public static func binary(_ name: String) throws -> String {
        let p = binDir + "/" + name
        guard FileManager.default.isExecutableFile(atPath: p) else {
            throw TestSupportError("\(p) is missing: run `swift build` before the tests (scripts/test does)")
        }
        return p
    }
}

/// A Tandem process started by a test (a worker or a dispatcher), with its stderr kept in a file.
public final class TandemProcess: @unchecked Sendable {
    public let process = Process()
    public let logPath: String
    public let name: String

    public init(_ executable: String, _ arguments: [String], environment: [String: String], logDir: String, name: String) throws {
        self.name = name
        logPath = "\(logDir)/\(name).log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: try Repo.binary(executable))
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        let h = FileHandle(forWritingAtPath: logPath)!
        process.standardError = h
        process.standardOutput = h
        try process.run()
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }
    public func signal(_ s: Int32) { kill(pid, s) }
    public func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Waits for exit (up to `timeout`), returning the exit status, or nil if it is still running.
    public func waitForExit(timeout: Duration) async -> Int32? {
        let clock = ContinuousClock()
        let end = clock.now + timeout
        while process.isRunning && clock.now < end { try? await Task.sleep(for: .milliseconds(50)) }
        return process.isRunning ? nil : process.terminationStatus
    }

    deinit {
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// One throwaway installation: Redis, a fresh Postgres database, and a directory for logs and fake-airflow state.
public final class Cluster: @unchecked Sendable {
    public let redis: RedisServer
    public let postgresURL: String
    public let dir: String
    public var processes: [TandemProcess] = []
    /// Added to (and overriding) `environment` for every process started afterwards.
    public var extraEnvironment: [String: String] = [:]

    /// A Postgres of this cluster's own, for tests that stop it (nil: the process-wide shared one).
    public let ownPostgres: PostgresServer?

    /// - Parameters:
    ///   - dedicatedPostgres: start a Postgres for this cluster alone (for tests that stop it).
    ///   - redisArguments: added to redis-server's command line (persistence, for tests that restart it).
    ///   - tls: Redis also listens with TLS, serving these certificates (requiring client certificates with
    ///     `requireClientCertificates`); `brokerURL` stays plain unless a test sets `brokerURLOverride`.
    public init(dedicatedPostgres: Bool = false, redisArguments: [String] = [], tls: TLSCertificates? = nil,
                requireClientCertificates: Bool = false) throws {
        redis = try tls.map { try RedisServer.startTLS($0, requireClientCertificates: requireClientCertificates) }
            ?? RedisServer.start(extraArguments: redisArguments)
        ownPostgres = dedicatedPostgres ? try PostgresServer.start() : nil
        postgresURL = try (ownPostgres ?? PostgresServer.shared()).createDatabase()
        dir = NSTemporaryDirectory() + "tandem-it-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir + "/locks", withIntermediateDirectories: true)
    }

    /// The broker URL Tandem's processes get (set before starting them); nil: the plain `redis.url`.
    public var brokerURLOverride: String?
    public var brokerURL: String { brokerURLOverride ?? redis.url }
    public var resultBackend: String { "db+postgresql+psycopg2://" + postgresURL.dropFirst("postgresql://".count) }
    public var fakeLog: String { dir + "/tasks.log" }

    /// Lets the fake `airflow` task `hold` of `dag`/`run` end (it runs until this file exists).
    public func release(dag: String, task: String = "hold", run: String) throws {
        try Data().write(to: URL(fileURLWithPath: dir + "/locks/\(dag).\(task).\(run).release"))
    }

    /// The environment every Tandem process of this cluster gets.
    public var environment: [String: String] {
        let path = URL(fileURLWithPath: Repo.fakeAirflow).deletingLastPathComponent().path
        return [
            "AIRFLOW__CELERY__BROKER_URL": brokerURL,
            "AIRFLOW__CELERY__RESULT_BACKEND": resultBackend,
            "PATH": path + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"),
            "TANDEM_FAKE_LOG": fakeLog,
            "TANDEM_FAKE_LOCKS": dir + "/locks",
            "TANDEM_LOG_LEVEL": "info",
            "TANDEM_SPOOL_DIR": dir + "/spool",
        ].merging(extraEnvironment) { $1 }
    }

    @discardableResult
    public func startWorker(dc: String, name: String, extra: [String] = []) throws -> TandemProcess {
        let p = try TandemProcess(
            "swift-worker", ["--dc", dc, "--worker-id", name] + extra, environment: environment, logDir: dir, name: name)
        processes.append(p)
        return p
    }

    @discardableResult
    public func startDispatcher(name: String = "dispatcher", extra: [String] = []) throws -> TandemProcess {
        let p = try TandemProcess("swift-dispatcher", extra, environment: environment, logDir: dir, name: name)
        processes.append(p)
        return p
    }

    /// Lines of the fake airflow's event log.
    public func taskEvents() -> [(event: String, key: String, executorID: String)] {
        timedTaskEvents().map { ($0.event, $0.key, $0.executorID) }
    }

    /// Lines of the fake airflow's event log with their wall-clock time (seconds since 1970).
    public func timedTaskEvents() -> [(event: String, key: String, executorID: String, at: Double)] {
        let text = (try? String(contentsOfFile: fakeLog, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            return f.count >= 3 ? (String(f[0]), String(f[1]), String(f[2]), f.count >= 5 ? Double(f[4]) ?? 0 : 0) : nil
        }
    }

    /// Every Tandem process's log, for a failing test's message.
    public func logs() -> String {
        processes.map { "--- \($0.name)\n" + String($0.log().suffix(3000)) }.joined(separator: "\n")
    }

    deinit {
        for p in processes where p.isRunning { p.signal(SIGKILL) }
        processes.removeAll()
        redis.stop()
        ownPostgres?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// Polls `condition` until it holds or `timeout` passes.
public func eventually(timeout: Duration, every: Duration = .milliseconds(100), _ condition: () async throws -> Bool)
    async rethrows -> Bool
{
    let clock = ContinuousClock()
    let end = clock.now + timeout
    while clock.now < end {
        if try await condition() { return true }
        try? await Task.sleep(for: every)
    }
    return try await condition()
}
