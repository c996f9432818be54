#if canImport(Glibc)
    import Glibc
#endif
import Foundation

/// A task's process: spawned with posix_spawn (never a shell) in its own process group, so signals Tandem
/// sends reach the whole task tree and signals sent to the worker never reach the task.
public final class ChildProcess: Sendable {
    public let pid: pid_t

    private init(pid: pid_t) { self.pid = pid }

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

    /// Spawns `argv` (argv[0] looked up on PATH when it has no slash) with exactly `environment`.
    /// - Parameter output: file to append the child's stdout and stderr to; nil inherits the worker's.
    public static func spawn(argv: [String], environment: [String: String], output: String? = nil) throws
        -> ChildProcess
    {
        precondition(!argv.isEmpty)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Own process group (pgid = pid); default signal dispositions and an empty mask, whatever the worker set.
        let flags = Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
        posix_spawnattr_setflags(&attr, flags)
        posix_spawnattr_setpgroup(&attr, 0)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGQUIT] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        if let output {
            posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o600)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }

        let cArgv = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgv { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc: Int32
        if argv[0].contains("/") {
            rc = posix_spawn(&pid, argv[0], &actions, &attr, cArgv, cEnv)
        } else {
            // posix_spawnp searches the worker's own PATH
            rc = posix_spawnp(&pid, argv[0], &actions, &attr, cArgv, cEnv)
        }
        guard rc == 0 else {
            throw SpawnError(
                description: "cannot start \(argv[0]): \(String(cString: strerror(rc))) — is it installed and on PATH?")
        }
        return ChildProcess(pid: pid)
    }

    /// Waits for the child to end. The blocking waitpid runs on a thread of its own, never on the Swift
    /// concurrency pool.
    public func wait() async -> Termination {
        let pid = self.pid
        return await withCheckedContinuation { (cont: CheckedContinuation<Termination, Never>) in
            let t = Thread {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1 {
                    if errno != EINTR {
                        cont.resume(returning: .exited(-1))
                        return
                    }
                }
                let sig = status & 0x7f
                cont.resume(returning: sig == 0 ? .exited((status >> 8) & 0xff) : .signalled(sig))
            }
            t.stackSize = 64 * 1024
            t.start()
        }
    }

    /// Sends `signal` to the task's whole process group.
    public func signalGroup(_ signal: Int32) {
        _ = kill(-pid, signal)
    }
}
