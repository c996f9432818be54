#if canImport(Glibc)
    import Glibc
#endif
import CSpawn
import ClientSupport
import Foundation

/// The worker's core: one thread that lives as long as the process and does three jobs that used to be three
/// threads handing each task to one another —
/// - it is the task executor the claim loop and every job's path run on (`WorkerRuntime` prefers it);
/// - it does every fork (Linux sends a child's parent-death signal when the *thread* that forked it exits, so
///   forks must come from a thread that never exits — never from pool threads, which come and go);
/// - it reaps every task process: one epoll over each child's pidfd (reaping exactly that pid, never
///   waitpid(-1), so children other code waits for are left alone).
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
public final class WorkerLoop: TaskExecutor, IOLoop, @unchecked Sendable {
    public static let shared = WorkerLoop()

    private enum Work {
        case job(UnownedJob)
        case call(@Sendable () -> Void)
    }

    private let epoll: Int32
    /// Written by other threads to wake the loop from epoll when work arrives.
    private let wakeFD: Int32
    private let lock = NSLock()
    private var queue: [Work] = []
    /// The loop is (about to be) blocked in epoll: whoever queues work next must wake it.
    private var parked = false
    private var children: [Int32: (pid: pid_t, done: @Sendable (ChildProcess.Termination) -> Void)] = [:]
    /// When the probe now waiting in the queue was queued (nil: none waiting).
    private var probeQueuedAt: ContinuousClock.Instant?
    /// Sockets driven here (`IOLoop`); touched only on the loop's thread.
    private var sources: [Int32: any IOSource] = [:]

    private init() {
        epoll = tandem_epoll_create()
        wakeFD = tandem_eventfd_create()
        precondition(epoll >= 0 && wakeFD >= 0, "cannot create the worker loop's epoll/eventfd: \(String(cString: strerror(errno)))")
        tandem_epoll_add(epoll, wakeFD)
        let t = Thread { [unowned self] in self.loop() }
        t.name = "tandem-loop"
        t.start()
    }

    // MARK: - As a task executor

    public func enqueue(_ job: consuming ExecutorJob) {
        push(.job(UnownedJob(job)))
    }

    /// True on the loop's own thread.
    static var isCurrent: Bool { tandem_on_loop_thread() != 0 }

    /// Runs `body` on the loop (right here when already on it); the caller suspends, no thread blocks.
    func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        if Self.isCurrent { return body() }
        return await withCheckedContinuation { (cont: CheckedContinuation<T, Never>) in
            push(.call { cont.resume(returning: body()) })
        }
    }

    private func push(_ work: Work) {
        lock.lock()
        queue.append(work)
        let wake = parked
        parked = false
        lock.unlock()
        if wake { tandem_eventfd_signal(wakeFD) }
    }

    // MARK: - As an IOLoop

    public var inLoop: Bool { Self.isCurrent }

    public func execute(_ body: @escaping @Sendable () -> Void) { push(.call(body)) }

    public func register(_ fd: Int32, _ source: any IOSource) {
        precondition(Self.isCurrent, "IOLoop.register off the loop")
        sources[fd] = source
        tandem_epoll_add(epoll, fd)
    }

    public func unregister(_ fd: Int32) {
        precondition(Self.isCurrent, "IOLoop.unregister off the loop")
        if sources.removeValue(forKey: fd) != nil { tandem_epoll_del(epoll, fd) }
    }

    public func setWantsWrite(_ fd: Int32, _ on: Bool) {
        if sources[fd] != nil { tandem_epoll_want_write(epoll, fd, on ? 1 : 0) }
    }

    /// Expires what has passed its deadline; returns how long epoll may sleep (-1: until an fd is ready).
    private func expireSources() -> Int32 {
        var next: ContinuousClock.Instant?
        let now = ContinuousClock.now
        for source in sources.values {
            guard let d = source.deadline else { continue }
            if d <= now { source.expire(now: now) }
            if let d = source.deadline { next = next.map { min($0, d) } ?? d }
        }
        guard let next else { return -1 }
        let ms = (next - now).inMilliseconds
        return Int32(clamping: max(1, ms + 1))
    }

    // MARK: - Stall watch

    /// Queues a no-op on the loop unless one is still waiting; `stalled` says how long it has waited. Called from
    /// the pool: a loop held up (a blocked write to a full log pipe, a stuck call) starts and reaps nothing.
    func probe() {
        lock.lock()
        let queue = probeQueuedAt == nil
        if queue { probeQueuedAt = .now }
        lock.unlock()
        if queue {
            push(.call { [self] in
                lock.lock()
                probeQueuedAt = nil
                lock.unlock()
            })
        }
    }

    /// How long the waiting probe has waited: about zero while the loop keeps up.
    var stalled: Duration {
        lock.lock()
        defer { lock.unlock() }
        return probeQueuedAt.map { .now - $0 } ?? .zero
    }

    // MARK: - As the reaper

    /// Calls `done` on the loop once `pid` has ended and been reaped.
    func watch(_ pid: pid_t, _ done: @escaping @Sendable (ChildProcess.Termination) -> Void) {
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
        lock.lock()
        children[fd] = (pid, done)
        lock.unlock()
        tandem_epoll_add(epoll, fd)
    }

    private func reap(_ fd: Int32) {
        lock.lock()
        let entry = children.removeValue(forKey: fd)
        lock.unlock()
        tandem_epoll_del(epoll, fd)
        close(fd)
        guard let entry else { return }
        var status: Int32 = 0
        var r: pid_t
        repeat { r = waitpid(entry.pid, &status, 0) } while r == -1 && errno == EINTR
        entry.done(r == entry.pid ? ChildProcess.termination(status) : .exited(-1))
    }

    // MARK: - The thread

    private func loop() {
        tandem_mark_loop_thread()
        // the kernel's name for the thread (Foundation's `name` is not), so profiles and /proc tell it apart
        tandem_name_thread("tandem-loop")
        // A task's exit sends SIGCHLD to the thread that forked it. Blocked here (threads inherit the pool's full
        // mask), the kernel queued it for the one thread that takes signals, the main thread parked in
        // sigsuspend, and woke that thread once per task for nothing. Unblocked, a SIGCHLD left at its default
        // disposition is discarded as it is sent. (Exits are learnt from pidfds, not from the signal.)
        var chld = sigset_t()
        sigemptyset(&chld)
        sigaddset(&chld, SIGCHLD)
        pthread_sigmask(SIG_UNBLOCK, &chld, nil)
        let executor = asUnownedTaskExecutor()
        var batch: [Work] = []
        var ready = [Int32](repeating: -1, count: 64)
        while true {
            lock.lock()
            swap(&batch, &queue)
            let idle = batch.isEmpty
            if idle { parked = true }
            lock.unlock()
            // ended children first (their slots free up for the claim loop); only a look when work is waiting
            let sleep = sources.isEmpty ? -1 : expireSources()
            let n = tandem_epoll_wait(epoll, &ready, Int32(ready.count), idle ? sleep : 0)
            if idle {
                // awake: what the reaping below queues needs no wake-up write
                lock.lock()
                parked = false
                lock.unlock()
            }
            for i in 0..<max(0, Int(n)) {
                if ready[i] == wakeFD {
                    tandem_eventfd_drain(wakeFD)
                } else if let source = sources[ready[i]] {
                    source.ready()
                } else {
                    reap(ready[i])
                }
            }
            for work in batch {
                switch work {
                case .job(let job): job.runSynchronously(on: executor)
                case .call(let body): body()
                }
            }
            batch.removeAll(keepingCapacity: true)
        }
    }
}
