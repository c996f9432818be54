#if canImport(Glibc)
    import Glibc
#endif
import CSpawn
import ClientSupport
import Foundation

/// The worker's core: one `EventLoopThread` that lives as long as the process and does three jobs that used to be
/// three threads handing each task to one another —
/// - it is the task executor the claim loop and every job's path run on (`WorkerRuntime` prefers it);
/// - it does every fork (Linux sends a child's parent-death signal when the *thread* that forked it exits, so
///   forks must come from a thread that never exits — never from pool threads, which come and go);
/// - it reaps every task process: it watches each child's pidfd (reaping exactly that pid, never waitpid(-1), so
///   children other code waits for are left alone).
///
/// So a task's start (claim reply → fork) and its end (pidfd → slot freed → next claim, and the job's own path
/// resuming) happen on this thread without waking another one: at concurrency 2 the spawner, reaper and pool
/// hand-offs were about half of the worker's ~20 context switches per task (Benchmarks/diag_switches.py).
///
/// It is also the `IOLoop` that drives the broker's Redis socket: claims and acks are written and answered here,
/// with no connection thread woken per call.
///
/// Only short, non-blocking work may run here: Postgres calls go to their connections' own threads and come back
/// as jobs, Redis connections are opened on a thread of their own; the lease and self-fencing loops stay on the
/// shared pool, so they still act if this thread is ever held up.
public enum WorkerLoop {
    public static let shared = EventLoopThread(name: "tandem-loop") {
        // A task's exit sends SIGCHLD to the thread that forked it. Blocked here (threads inherit the pool's full
        // mask), the kernel queued it for the one thread that takes signals, the main thread parked in
        // sigsuspend, and woke that thread once per task for nothing. Unblocked, a SIGCHLD left at its default
        // disposition is discarded as it is sent. (Exits are learnt from pidfds, not from the signal.)
        var chld = sigset_t()
        sigemptyset(&chld)
        sigaddset(&chld, SIGCHLD)
        pthread_sigmask(SIG_UNBLOCK, &chld, nil)
    }

    /// True on the loop's own thread.
    public static var isCurrent: Bool { shared.inLoop }

    /// Calls `done` on the loop once `pid` has ended and been reaped.
    static func watch(_ pid: pid_t, _ done: @escaping @Sendable (ChildProcess.Termination) -> Void) {
        let fd = tandem_pidfd_open(pid)
        guard fd >= 0 else {
            // no pidfd (old kernel): wait on a thread of its own
            let t = Thread {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1 {
                    if errno != EINTR { return done(.exited(-1)) }
                }
                done(ChildProcess.termination(status))
            }
            t.stackSize = 64 * 1024
            t.start()
            return
        }
        let child = ExitedChild(fd: fd, pid: pid, done: done)
        if isCurrent { shared.register(fd, child) } else { shared.execute { shared.register(fd, child) } }
    }
}

/// A task process's pidfd on the worker loop: readable once the process has ended; then reaped, exactly that pid.
private final class ExitedChild: IOSource, Sendable {
    let fd: Int32
    let pid: pid_t
    let done: @Sendable (ChildProcess.Termination) -> Void

    init(fd: Int32, pid: pid_t, done: @escaping @Sendable (ChildProcess.Termination) -> Void) {
        self.fd = fd
        self.pid = pid
        self.done = done
    }

    func ready() {
        WorkerLoop.shared.unregister(fd)
        close(fd)
        var status: Int32 = 0
        var r: pid_t
        repeat { r = waitpid(pid, &status, 0) } while r == -1 && errno == EINTR
        done(r == pid ? ChildProcess.termination(status) : .exited(-1))
    }

    var deadline: ContinuousClock.Instant? { nil }
    func expire(now: ContinuousClock.Instant) {}
}
