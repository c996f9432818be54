#if canImport(Glibc)
    import Glibc
#endif
import CeleryWire
import Foundation
import Logging
import TandemCore
import Worker

/// Exit codes of a runner-forked task (Protocol/RUNNER.md).
public enum RunnerExit {
    /// The workload ran; Airflow 3 tasks reported their own state to the Execution API. → SUCCESS
    public static let ok: Int32 = 0
    /// Infrastructure failure (bad workload, supervisor crash, API unreachable). → FAILURE
    public static let failure: Int32 = 1
    /// The runner died while the task ran; the task was killed with it. → FAILURE
    public static let runnerLost: Int32 = 70
    /// TaskAlreadyRunningError (Execution API 409): a duplicate delivery. → ack, write no result
    public static let alreadyRunning: Int32 = 75
    /// The Execution API refused the token (401/403, e.g. expired); the task never started. → FAILURE
    public static let tokenRefused: Int32 = 77
}

public struct RunnerError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// Starts each task by asking a long-lived Python runner (`Workers/runner/tandem_runner.py`) that imported Airflow
/// once to fork a child. The runner is started, watched and restarted by this launcher; if it dies, every task it
/// was running is killed (its process group) and reported as ended with `RunnerExit.runnerLost`.
public final class RunnerLauncher: TaskLauncher, @unchecked Sendable {
    public struct Options: Sendable {
        /// Python with Airflow installed.
        public var python: String
        /// Path of tandem_runner.py.
        public var script: String
        /// The runner's environment (the worker's, plus Airflow settings).
        public var environment: [String: String]
        /// Private directory for the socket.
        public var workDirectory: String
        /// Append the runner's and its tasks' stdout/stderr here (nil: the worker's own).
        public var taskOutput: String?
        /// `AIRFLOW__CORE__EXECUTION_API_SERVER_URL` for Airflow 3 tasks.
        public var executionAPIServerURL: String?
        /// Modules to import before serving (nil: the runner's defaults for the installed Airflow).
        public var preload: [String]?
        /// Seconds a pooled child may idle before it exits (nil: the runner's default, 60; 0: never).
        public var poolIdle: Double?
        /// Extra runner arguments (tests: `--allow-test-kinds`).
        public var extraArguments: [String] = []
        /// How long a (re)start may take to import Airflow and say hello.
        public var startTimeout: Duration = .seconds(120)
        /// How long `launch` waits for the runner's `started` reply.
        public var launchTimeout: Duration = .seconds(60)

        public init(
            python: String, script: String, environment: [String: String] = ProcessInfo.processInfo.environment,
            workDirectory: String, taskOutput: String? = nil, executionAPIServerURL: String? = nil,
            preload: [String]? = nil, poolIdle: Double? = nil
        ) {
            self.python = python
            self.script = script
            self.environment = environment
            self.workDirectory = workDirectory
            self.taskOutput = taskOutput
            self.executionAPIServerURL = executionAPIServerURL
            self.preload = preload
            self.poolIdle = poolIdle
        }
    }

    /// What the runner said in its hello.
    public struct RunnerInfo: Sendable {
        public var pid: Int32
        public var airflowVersion: String
        public var pythonVersion: String
    }

    public let options: Options
    private let logger: Logger
    private let cond = NSCondition()
    private let writeLock = NSLock()
    // guarded by cond
    private var fd: Int32 = -1
    private var info: RunnerInfo?
    private var generation = 0
    private var nextID = 0
    private var stopped = false
    private var pending: [String: PendingStart] = [:]
    private var running: [String: RunnerTask] = [:]
    private var starts = 0
    private var lateStartsKilled = 0
    private var supervisor: Thread?

    /// A launch waiting for the runner's answer. Touched under `cond`.
    private final class PendingStart: @unchecked Sendable {
        var task: RunnerTask?
        var error: String?
        /// The suspended launch; resumed once, by whichever comes first: the answer, the runner's death or stop,
        /// or the launch timeout.
        var waiter: CheckedContinuation<Void, Never>?
        /// Takes the waiter, to be resumed once `cond` is released.
        func takeWaiter() -> CheckedContinuation<Void, Never>? {
            defer { waiter = nil }
            return waiter
        }
    }

    public init(options: Options, logger: Logger) {
        self.options = options
        var l = logger
        l[metadataKey: "component"] = "runner"
        self.logger = l
    }

    /// The current runner, once it has said hello.
    public var runner: RunnerInfo? { cond.lock(); defer { cond.unlock() }; return info }
    /// How many times the runner has been started (1 + restarts).
    public var startCount: Int { cond.lock(); defer { cond.unlock() }; return starts }
    /// Tasks the runner started after their launch had given up, killed at once.
    public var lateStarts: Int { cond.lock(); defer { cond.unlock() }; return lateStartsKilled }
    /// Launches sent to the runner and waiting for its answer.
    public var launchesWaiting: Int { cond.lock(); defer { cond.unlock() }; return pending.count }
    /// Tasks the runner is running now.
    public var runningCount: Int { cond.lock(); defer { cond.unlock() }; return running.count }

    /// Starts the runner and waits until it is ready (Airflow imported), then keeps it running.
    public func start() throws {
        cond.lock()
        if supervisor == nil {
            let t = Thread { [self] in superviseLoop() }
            t.name = "tandem.runner.supervisor"
            t.stackSize = 512 * 1024
            supervisor = t
            t.start()
        }
        cond.unlock()
        guard waitReady(timeout: options.startTimeout) else {
            throw RunnerError(
                "the Airflow runner did not become ready within \(options.startTimeout) — check that \(options.python) "
                    + "can import airflow and that \(options.script) exists (its output: \(options.taskOutput ?? "the worker's stderr"))")
        }
    }

    /// Stops the runner (its tasks die with it: they carry a parent-death signal).
    public func stop() {
        cond.lock()
        stopped = true
        let f = fd
        let pid = info?.pid
        let waiters = pending.values.compactMap { $0.takeWaiter() }
        cond.broadcast()
        cond.unlock()
        for w in waiters { w.resume() }
        if let pid { kill(pid, SIGTERM) }
        if f >= 0 { shutdown(f, Int32(SHUT_RDWR)) }
    }

    /// Kills the runner (tests: the worker must recover).
    public func killRunner(signal: Int32 = SIGKILL) {
        if let pid = runner?.pid { kill(pid, signal) }
    }

    private func waitReady(timeout: Duration) -> Bool {
        let deadline = Date().addingTimeInterval(timeout.inSeconds)
        cond.lock()
        defer { cond.unlock() }
        while fd < 0 || info == nil {
            if stopped { return false }
            if !cond.wait(until: deadline) { return fd >= 0 && info != nil }
        }
        return true
    }

    // MARK: - Launching

    public func launch(_ payload: AirflowPayload, taskID: String) async throws -> LaunchedTask {
        var request: JSONObject = ["op": "run"]
        var env: JSONObject = [:]
        switch payload {
        case .workload(let w):
            if let exp = JWTPeek.expiry(of: w.token), exp < Date() {
                throw RunnerError(
                    "workload token expired at \(exp) (\(Int(Date().timeIntervalSince(exp)))s ago): task not started; "
                        + "the scheduler re-queues the task instance")
            }
            request["kind"] = "workload"
            request["workload"] = .string(w.json)
            if let url = options.executionAPIServerURL { env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = .string(url) }
        case .command(let argv):
            request["kind"] = "command"
            request["argv"] = .array(argv.map { .string($0) })
            env["external_executor_id"] = .string(taskID)
        }
        env["TANDEM_TASK_ID"] = .string(taskID)
        request["env"] = .object(env)
        return LaunchedTask(process: try await launch(request: request), cleanup: [])
    }

    /// Sends one `run` request (its `id` is set here) and waits for the runner's `started` reply.
    public func launch(request: JSONObject) async throws -> RunnerTask {
        var request = request
        request["op"] = "run"
        guard await waitReadyAsync(timeout: options.startTimeout) else {
            if cond.withLock({ stopped }) {
                throw TaskNotStarted("the Airflow runner was stopped (the worker is shutting down); task not started")
            }
            throw TaskNotStarted("the Airflow runner is not running (restarting failed for \(options.startTimeout)); task not started")
        }
        let p = PendingStart()
        let (rid, gen, f): (String, Int, Int32) = cond.withLock {
            nextID += 1
            let rid = "r\(nextID)"
            pending[rid] = p
            return (rid, generation, fd)
        }
        request["id"] = .string(rid)
        var line = Array(JSONValue.object(request).serialized().utf8)
        line.append(0x0A)
        if !send(f, line) {
            cond.withLock { pending[rid] = nil }
            throw TaskNotStarted("cannot send the task to the Airflow runner (it just died?); task not started")
        }
        let clock = ContinuousClock()
        let deadline = clock.now + options.launchTimeout
        // the answer resumes this launch from the thread that reads the runner's socket (no polling: a poll every
        // 500 µs cost each start a timer and two thread wake-ups per poll); this timer only bounds the wait
        let timeout = Task { [cond, launchTimeout = options.launchTimeout] in
            try? await Task.sleep(for: launchTimeout)
            if Task.isCancelled { return }
            cond.withLock { p.takeWaiter() }?.resume()
        }
        defer { timeout.cancel() }
        while true {
            let state: (RunnerTask?, String?, Bool, Bool) = cond.withLock {
                (p.task, p.error, generation != gen, stopped)
            }
            if let t = state.0 {
                cond.withLock { pending[rid] = nil }
                return t
            }
            // stop() shuts the runner's socket, so its reader may also record "the runner died": stopping is
            // checked first, so that a worker shutting down says so rather than blaming the runner
            if state.3 {
                cond.withLock { pending[rid] = nil }
                throw TaskNotStarted("the Airflow runner was stopped (the worker is shutting down); task not started")
            }
            if let e = state.1 {
                cond.withLock { pending[rid] = nil }
                throw RunnerError("the Airflow runner could not start the task: \(e); task not started")
            }
            if state.2 {
                cond.withLock { pending[rid] = nil }
                throw TaskNotStarted("the Airflow runner died before starting the task; task not started")
            }
            if clock.now >= deadline {
                cond.withLock { pending[rid] = nil }
                throw RunnerError("the Airflow runner did not start the task within \(options.launchTimeout)")
            }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let settled = cond.withLock {
                    let settled = p.task != nil || p.error != nil || generation != gen || stopped
                    if !settled { p.waiter = c }
                    return settled
                }
                if settled { c.resume() }
            }
        }
    }

    private func waitReadyAsync(timeout: Duration) async -> Bool {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let (ready, s) = cond.withLock { (fd >= 0 && info != nil, stopped) }
            if ready { return true }
            if s || clock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    private func send(_ f: Int32, _ bytes: [UInt8]) -> Bool {
        guard f >= 0 else { return false }
        writeLock.lock()
        defer { writeLock.unlock() }
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(f, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            off += n
        }
        return true
    }

    // MARK: - Supervising the runner

    private func socketPath(_ attempt: Int) -> String {
        let p = "\(options.workDirectory)/runner-\(getpid())-\(attempt).sock"
        if p.utf8.count < 100 { return p }
        return NSTemporaryDirectory() + "tandem-runner-\(getpid())-\(attempt).sock"
    }

    private func superviseLoop() {
        var backoff = 0.5
        var attempt = 0
        while true {
            cond.lock()
            let isStopped = stopped
            cond.unlock()
            if isStopped { return }
            attempt += 1
            let began = Date()
            runOnce(attempt: attempt)
            cond.lock()
            let nowStopped = stopped
            cond.unlock()
            if nowStopped { return }
            // a runner that lived a while restarts at once; one that keeps dying backs off
            if Date().timeIntervalSince(began) > 30 { backoff = 0.5 }
            logger.warning("the Airflow runner stopped; restarting in \(backoff)s")
            Thread.sleep(forTimeInterval: backoff)
            backoff = min(backoff * 2, 30)
        }
    }

    /// One runner life: listen, spawn, accept, read until EOF, then clean up.
    private func runOnce(attempt: Int) {
        let path = socketPath(attempt)
        unlink(path)
        let lfd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard lfd >= 0 else {
            logger.error("cannot create the runner socket: \(String(cString: strerror(errno)))")
            return
        }
        defer {
            close(lfd)
            unlink(path)
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { buf in
            let b = Array(path.utf8)
            for i in 0..<min(b.count, buf.count - 1) { buf[i] = b[i] }
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(lfd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(lfd, 1) == 0 else {
            logger.error("cannot listen on \(path): \(String(cString: strerror(errno))) — check --work-dir")
            return
        }
        chmod(path, 0o600)

        var argv = [options.python, options.script, "--connect", path]
        argv += options.extraArguments
        if let idle = options.poolIdle { argv += ["--pool-idle", String(idle)] }
        if let pre = options.preload { argv += pre.isEmpty ? ["--no-preload"] : ["--preload", pre.joined(separator: ",")] }
        var env = options.environment
        if let url = options.executionAPIServerURL { env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = url }
        env["PYTHONUNBUFFERED"] = "1"
        let proc: ChildProcess
        do {
            proc = try Self.spawnBlocking(argv: argv, environment: env, output: options.taskOutput)
        } catch {
            logger.error("cannot start the Airflow runner: \(error)")
            return
        }
        cond.lock()
        starts += 1
        cond.unlock()
        logger.info("Airflow runner starting", metadata: ["pid": "\(proc.pid)"])

        // accept, watching the runner in case it dies while importing
        var cfd: Int32 = -1
        let deadline = Date().addingTimeInterval(options.startTimeout.inSeconds)
        while cfd < 0 {
            var pfd = pollfd(fd: lfd, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, 200)
            if r > 0 {
                cfd = accept(lfd, nil, nil)
                if cfd >= 0 { _ = fcntl(cfd, F_SETFD, FD_CLOEXEC) }
                continue
            }
            var status: Int32 = 0
            if waitpid(proc.pid, &status, WNOHANG) == proc.pid {
                logger.error("the Airflow runner exited before connecting (status \(status)); see its output")
                return
            }
            cond.lock()
            let s = stopped
            cond.unlock()
            if s || Date() > deadline {
                kill(proc.pid, SIGKILL)
                var st: Int32 = 0
                waitpid(proc.pid, &st, 0)
                if !s { logger.error("the Airflow runner did not connect within \(options.startTimeout); killed it") }
                return
            }
        }

        cond.lock()
        fd = cfd
        cond.unlock()
        readLoop(cfd, runnerPID: proc.pid)

        // the runner is gone (or its socket is): make sure of it, then fail what it was running
        cond.lock()
        fd = -1
        info = nil
        generation += 1
        let orphans = running
        running = [:]
        let waiters = pending.values.compactMap { $0.takeWaiter() }
        cond.broadcast()
        cond.unlock()
        for w in waiters { w.resume() }
        kill(proc.pid, SIGKILL)
        var st: Int32 = 0
        while waitpid(proc.pid, &st, 0) == -1 && errno == EINTR {}
        close(cfd)
        for (_, t) in orphans {
            t.signalGroup(SIGKILL)
            t.finish(.exited(RunnerExit.runnerLost))
        }
        if !orphans.isEmpty {
            logger.error("the Airflow runner died with \(orphans.count) task(s) running; they were killed and are reported as failed")
        }
    }

    /// ChildProcess.spawn is async; the supervisor is a plain thread, so it waits for it here.
    private static func spawnBlocking(argv: [String], environment: [String: String], output: String?) throws -> ChildProcess {
        let box = ResultBox()
        let sem = DispatchSemaphore(value: 0)
        Task {
            do { box.set(.success(try await ChildProcess.spawn(argv: argv, environment: environment, output: output, reapedBySpawner: true))) } catch {
                box.set(.failure(error))
            }
            sem.signal()
        }
        sem.wait()
        return try box.get()
    }

    private final class ResultBox: @unchecked Sendable {
        private let lock = NSLock()
        private var value: Result<ChildProcess, Error>?
        func set(_ v: Result<ChildProcess, Error>) { lock.withLock { value = v } }
        func get() throws -> ChildProcess { try lock.withLock { value! }.get() }
    }

    private func readLoop(_ cfd: Int32, runnerPID: Int32) {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(cfd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            buffer.append(contentsOf: chunk[0..<n])
            while let nl = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                if !line.isEmpty { handle(line, runnerPID: runnerPID) }
            }
        }
    }

    private func handle(_ line: [UInt8], runnerPID: Int32) {
        guard let msg = try? JSONValue.parse(line), let event = msg["event"]?.string else {
            logger.warning("unreadable line from the Airflow runner")
            return
        }
        let rid = msg["id"]?.string ?? ""
        switch event {
        case "hello":
            let i = RunnerInfo(
                pid: Int32(msg["pid"]?.int ?? Int64(runnerPID)), airflowVersion: msg["airflow"]?.string ?? "",
                pythonVersion: msg["python"]?.string ?? "")
            cond.lock()
            info = i
            cond.broadcast()
            cond.unlock()
            logger.info(
                "Airflow runner ready",
                metadata: ["pid": "\(i.pid)", "airflow": .string(i.airflowVersion), "python": .string(i.pythonVersion)])
        case "started":
            cond.lock()
            let t = RunnerTask(pid: Int32(msg["pid"]?.int ?? 0))
            guard let p = pending[rid] else {
                // its launch gave up (timed out, or the worker is stopping) and the task was reported as not
                // started: it must not run unseen beside whatever runs it next
                lateStartsKilled += 1
                cond.unlock()
                if t.pid > 0 { kill(-t.pid, SIGKILL) }  // the task leads its own process group
                logger.error("the Airflow runner started task \(rid) (pid \(t.pid)) after its launch gave up; killed it")
                return
            }
            // registered before the reply is read, so an exit that follows at once is never missed
            running[rid] = t
            p.task = t
            let w = p.takeWaiter()
            cond.broadcast()
            cond.unlock()
            w?.resume()
        case "error":
            cond.lock()
            pending[rid]?.error = msg["message"]?.string ?? "unknown error"
            let w = pending[rid]?.takeWaiter()
            cond.broadcast()
            cond.unlock()
            w?.resume()
        case "exit":
            let t: ChildProcess.Termination =
                if let s = msg["signal"]?.int { .signalled(Int32(s)) } else { .exited(Int32(msg["status"]?.int ?? -1)) }
            cond.lock()
            let task = running.removeValue(forKey: rid)
            cond.unlock()
            task?.finish(t)
        default:
            break
        }
    }
}

/// A task the runner forked: signalled by process group, waited for by the runner's exit report.
public final class RunnerTask: RunningTask, Sendable {
    public let pid: Int32
    private let end = ProcessEnd()

    init(pid: Int32) { self.pid = pid }

    public func wait() async -> ChildProcess.Termination { await end.wait() }

    /// Signals the task's process group, unless it has already ended (its pid may be reused).
    public func signalGroup(_ signal: Int32) { end.ifRunning { _ = kill(-pid, signal) } }

    public func onEnd(_ body: @escaping @Sendable (ChildProcess.Termination) -> Void) { end.onEnd(body) }

    public var ended: ChildProcess.Termination? { end.ended }

    func finish(_ t: ChildProcess.Termination) { end.deliver(t) }
}

/// Reads a JWT's `exp` without verifying it (the worker has no key for the Execution API's tokens; the API
/// verifies). Used only to avoid starting a task whose token is already dead.
public enum JWTPeek {
    public static func claims(of token: String) -> JSONObject? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let bytes = base64URLDecode(String(parts[1])) else { return nil }
        return (try? JSONValue.parse(bytes))?.object
    }

    public static func expiry(of token: String) -> Date? {
        guard let exp = claims(of: token)?["exp"]?.double else { return nil }
        return Date(timeIntervalSince1970: exp)
    }

    public static func base64URLDecode(_ s: String) -> [UInt8]? {
        var t = s.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while t.utf8.count % 4 != 0 { t += "=" }
        guard let d = Data(base64Encoded: t) else { return nil }
        return Array(d)
    }
}
