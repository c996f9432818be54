#if canImport(Glibc)
    import Glibc
#endif
import CSpawn
import Foundation
import Synchronization

/// A task's process: fork+exec through CSpawn (never a shell) in its own process group, so signals Tandem
/// sends reach the whole task tree and signals sent to the worker never reach the task.
public final class ChildProcess: Sendable {
    public let pid: pid_t
    /// Delivered by the worker loop, which watches the child from the moment it exists (or, for a child its
    /// spawner reaps itself, from the first `wait()`).
    let end: ProcessEnd
    private let watched: Mutex<Bool>

    private init(pid: pid_t, end: ProcessEnd, watched: Bool) {
        self.pid = pid
        self.end = end
        self.watched = Mutex(watched)
    }

    /// How a child ended.
    public enum Termination: Sendable, Hashable, CustomStringConvertible {
        case exited(Int32)
        case signalled(Int32)
        /// Shell-style status: the exit code, or 128 + signal.
        public var status: Int32 {
            switch self {
            case .exited(let c): return c
            case .signalled(let s): return 128 + s
            }
        }
        public var description: String {
            switch self {
            case .exited(let c): return "exit status \(c)"
            case .signalled(let s): return "killed by signal \(s)"
            }
        }
    }

    public struct SpawnError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Spawns `argv` (argv[0] looked up on PATH when it has no slash) with exactly `environment`, in its own
    /// process group, with SIGKILL as its parent-death signal: a worker killed with -9 takes its tasks with it,
    /// so a reclaimed task never runs twice at once.
    /// - Parameter output: file to append the child's stdout and stderr to; nil inherits the worker's.
    /// - Parameter reapedBySpawner: the caller reaps the child itself (waitpid); it is watched only if `wait()` is
    ///   called.
    public static func spawn(
        argv: [String], environment: [String: String], output: String? = nil, reapedBySpawner: Bool = false
    ) async throws -> ChildProcess {
        try await spawn(argv: argv, environment: SpawnEnvironment(environment), output: output, reapedBySpawner: reapedBySpawner)
    }

    /// Spawns `argv` with a prepared environment plus `adding` (keys the environment was told to leave out).
    public static func spawn(
        argv: [String], environment: SpawnEnvironment, adding extra: [String: String] = [:], output: String? = nil,
        reapedBySpawner: Bool = false
    ) async throws -> ChildProcess {
        precondition(!argv.isEmpty)
        assert(extra.keys.allSatisfy(environment.leftOut.contains), "added keys must be left out of the base environment")
        guard let path = environment.executable(argv[0]) else {
            throw SpawnError(description: "cannot start \(argv[0]): not found on PATH — is it installed? (PATH=\(environment.searchPath ?? ""))")
        }
        let extraStrings = extra.map { "\($0.key)=\($0.value)" }
        let end = ProcessEnd()
        // The loop watches the child from the moment it exists, so its end is seen as soon as it comes rather than
        // once someone gets round to waiting (for a short task, that wait was most of its life). Called on the
        // loop (the worker's own path), the fork runs right here.
        let result = await WorkerLoop.shared.run { () -> (Int32, pid_t) in
            let r = environment.withEnvironment(adding: extraStrings) { cEnv in
                withCStrings(argv) { cArgv in
                    var pid: pid_t = 0
                    let rc: Int32
                    if let output {
                        rc = tandem_spawn(path, cArgv, cEnv, output, SIGKILL, &pid)
                    } else {
                        rc = tandem_spawn(path, cArgv, cEnv, nil, SIGKILL, &pid)
                    }
                    return (rc, pid)
                }
            }
            if r.0 == 0 && !reapedBySpawner { WorkerLoop.watch(r.1) { end.deliver($0) } }
            return r
        }
        guard result.0 == 0 else {
            // found on PATH once, gone now: look it up afresh next time
            if result.0 == ENOENT { environment.forget(argv[0]) }
            throw SpawnError(description: "cannot start \(path): \(String(cString: strerror(result.0))) — check that it exists and is executable")
        }
        return ChildProcess(pid: result.1, end: end, watched: !reapedBySpawner)
    }

    /// A NULL-terminated array of C strings for `strings`, alive for `body`.
    static func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> R) -> R {
        let c = strings.map { strdup($0) } + [nil]
        defer { for p in c { free(p) } }
        return body(c)
    }

    /// PATH lookup done in the worker, so nothing but execve runs in the child.
    static func resolve(_ name: String, path: String?) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        for dir in (path ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Waits for the child to end, without blocking a thread: the worker loop watches every child's pidfd with
    /// epoll (a thread per child cost a fifth of the worker's CPU).
    public func wait() async -> Termination {
        let watch = watched.withLock { w in
            defer { w = true }
            return !w
        }
        if watch { WorkerLoop.watch(pid) { [end] in end.deliver($0) } }
        return await end.wait()
    }

    /// Runs `body` on the worker loop as the child is reaped (at once if it already was).
    public func onEnd(_ body: @escaping @Sendable (Termination) -> Void) { end.onEnd(body) }

    static func termination(_ status: Int32) -> Termination {
        let sig = status & 0x7f
        return sig == 0 ? .exited((status >> 8) & 0xff) : .signalled(sig)
    }

    /// Sends `signal` to the task's whole process group, unless it has been reaped (its pid may be reused).
    public func signalGroup(_ signal: Int32) {
        end.ifRunning { _ = kill(-pid, signal) }
    }
}

/// The environment and executable lookups every spawn of a launcher shares, prepared once: turning the whole
/// environment into "KEY=value" C strings and searching PATH on every spawn cost about a tenth of the worker
/// loop's time with no-op tasks.
public final class SpawnEnvironment: @unchecked Sendable {
    /// "KEY=value", allocated here once and never changed (a vfork'd child reads them until it execs); optional
    /// only because that is how an envp array holds them.
    private let strings: [UnsafeMutablePointer<CChar>?]
    /// Keys left out, for a spawn to add with its own values.
    let leftOut: Set<String>
    let searchPath: String?
    private let found = Mutex<[String: String]>([:])

    /// - Parameter leaving: keys not to pass on from `environment`; a spawn may add them (`adding:`).
    public init(_ environment: [String: String], leaving: Set<String> = []) {
        strings = environment.filter { !leaving.contains($0.key) }.map { strdup("\($0.key)=\($0.value)")! }
        leftOut = leaving
        searchPath = environment["PATH"] ?? ProcessInfo.processInfo.environment["PATH"]
    }

    deinit { for p in strings { free(p) } }

    /// `name`'s path: as given when it has a slash, else the first executable match on PATH, remembered.
    func executable(_ name: String) -> String? {
        if let known = found.withLock({ $0[name] }) { return known }
        guard let path = ChildProcess.resolve(name, path: searchPath) else { return nil }
        found.withLock { $0[name] = path }
        return path
    }

    func forget(_ name: String) { _ = found.withLock { $0.removeValue(forKey: name) } }

    /// The NULL-terminated environment with `extra` ("KEY=value") appended, alive for `body`.
    func withEnvironment<R>(adding extra: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> R) -> R {
        ChildProcess.withCStrings(extra) { added in withExtendedLifetime(self) { body(strings + added) } }
    }
}

/// A task process's end, delivered once — by the worker loop, or by a runner's exit report — to whoever waits
/// for it and to whatever asked to hear of it on the delivering thread.
public final class ProcessEnd: @unchecked Sendable {
    private let lock = NSLock()
    private var termination: ChildProcess.Termination?
    private var waiters: [CheckedContinuation<ChildProcess.Termination, Never>] = []
    private var observers: [@Sendable (ChildProcess.Termination) -> Void] = []

    public init() {}

    /// How it ended; nil while it runs.
    public var ended: ChildProcess.Termination? { lock.withLock { termination } }

    public func wait() async -> ChildProcess.Termination {
        await withCheckedContinuation { (c: CheckedContinuation<ChildProcess.Termination, Never>) in
            lock.lock()
            if let t = termination {
                lock.unlock()
                c.resume(returning: t)
            } else {
                waiters.append(c)
                lock.unlock()
            }
        }
    }

    /// Runs `body` on the delivering thread when the end comes (at once, here, if it has come): for short work that
    /// should not wait for a pool thread, such as freeing the task's slot.
    public func onEnd(_ body: @escaping @Sendable (ChildProcess.Termination) -> Void) {
        lock.lock()
        if let t = termination {
            lock.unlock()
            body(t)
        } else {
            observers.append(body)
            lock.unlock()
        }
    }

    /// Runs `body` (a kill) under the lock, unless the process has ended: once reaped, its pid may be another's.
    public func ifRunning(_ body: () -> Void) {
        lock.lock()
        defer { lock.unlock() }
        if termination == nil { body() }
    }

    /// Records the end; the first delivery wins.
    public func deliver(_ t: ChildProcess.Termination) {
        lock.lock()
        guard termination == nil else {
            lock.unlock()
            return
        }
        termination = t
        let (w, o) = (waiters, observers)
        waiters = []
        observers = []
        lock.unlock()
        for body in o { body(t) }
        for c in w { c.resume(returning: t) }
    }
}

/// `--pin-cpu`: the worker's own threads on one CPU, its task processes on every CPU it was allowed.
public enum ThreadPinning {
    /// Pins every thread of the worker (and those it creates later) to `cpu`; task processes started afterwards
    /// run on the CPUs the worker had before. Returns nil, or why it could not (the worker must then not start).
    public static func pin(to cpu: Int) -> String? {
        let rc = tandem_pin_threads(Int32(cpu))
        if rc == 0 { return nil }
        return rc == EINVAL ? "CPU \(cpu) is not one this process may run on (see `taskset -p \(getpid())`)"
            : String(cString: strerror(rc))
    }
}
