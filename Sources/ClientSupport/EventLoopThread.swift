#if canImport(Glibc)
    import Glibc
#endif
import CEventLoop
import Foundation

/// One thread that lives as long as the process, waits on sockets with epoll and runs whatever is queued on it:
/// - as a `TaskExecutor`, the tasks that prefer it run here, so an `await` on a client it drives resumes right
///   here, with no other thread woken;
/// - as an `IOLoop`, clients write their requests and read their replies here (`LoopDrivenRedis`).
///
/// A call on a blocking client costs two thread switches (its connection thread, then the caller's), and on this
/// virtual machine each switch to an idle CPU costs a few hundred microseconds: the dispatcher's three calls per
/// wake-up were most of the time a message spent between Airflow's publish and the worker's claim.
///
/// The worker's `WorkerLoop.shared` is one (it also forks and reaps the tasks there); the dispatcher runs its
/// whole cycle on one of its own. Only short, non-blocking work may run here.
public final class EventLoopThread: TaskExecutor, IOLoop, @unchecked Sendable {
    private enum Work {
        case job(UnownedJob)
        case call(@Sendable () -> Void)
    }

    public let name: String
    private let epoll: Int32
    /// Written by other threads to wake the loop from epoll when work arrives.
    private let wakeFD: Int32
    private let lock = NSLock()
    private var queue: [Work] = []
    /// The loop is (about to be) blocked in epoll: whoever queues work next must wake it.
    private var parked = false
    /// When the probe now waiting in the queue was queued (nil: none waiting).
    private var probeQueuedAt: ContinuousClock.Instant?
    /// Sockets driven here; touched only on the loop's thread.
    private var sources: [Int32: any IOSource] = [:]

    /// Starts the thread, named `name` for the kernel (at most 15 characters show in /proc, perf and top -H).
    /// `prepare` runs first on the new thread (the worker unblocks SIGCHLD there).
    public init(name: String, prepare: @escaping @Sendable () -> Void = {}) {
        self.name = name
        epoll = tandem_epoll_create()
        wakeFD = tandem_eventfd_create()
        precondition(epoll >= 0 && wakeFD >= 0, "cannot create the \(name) loop's epoll/eventfd: \(String(cString: strerror(errno)))")
        tandem_epoll_add(epoll, wakeFD)
        // the thread holds the loop: a loop lives as long as the process
        let t = Thread { [self] in
            prepare()
            loop()
        }
        t.name = name
        t.start()
    }

    // MARK: - As a task executor

    public func enqueue(_ job: consuming ExecutorJob) {
        push(.job(UnownedJob(job)))
    }

    /// Runs `body` on the loop (right here when already on it); the caller suspends, no thread blocks.
    public func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        if inLoop { return body() }
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

    /// True on this loop's own thread (a thread-local compare: cheap enough for every call).
    public var inLoop: Bool { tandem_current_loop() == UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque()) }

    public func execute(_ body: @escaping @Sendable () -> Void) { push(.call(body)) }

    public func register(_ fd: Int32, _ source: any IOSource) {
        precondition(inLoop, "IOLoop.register off the \(name) loop")
        sources[fd] = source
        tandem_epoll_add(epoll, fd)
    }

    public func unregister(_ fd: Int32) {
        precondition(inLoop, "IOLoop.unregister off the \(name) loop")
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
        return Int32(clamping: max(1, (next - now).wholeMilliseconds + 1))
    }

    // MARK: - Stall watch

    /// Queues a no-op on the loop unless one is still waiting; `stalled` says how long it has waited. Called from
    /// another thread: a loop held up (a blocked write to a full log pipe, a stuck call) does nothing else.
    public func probe() {
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
    public var stalled: Duration {
        lock.lock()
        defer { lock.unlock() }
        return probeQueuedAt.map { .now - $0 } ?? .zero
    }

    /// Watches the loop until the calling task is cancelled; call it from the pool, never from this loop. Once a
    /// second it probes the loop and passes `report` how long the waiting probe has waited; `stalledFor` hears
    /// once when a stall reaches `warnAfter`, `runsAgain` once it is over (the probe waits under a fifth of that).
    public func watchStalls(
        warnAfter: Duration, report: (Duration) -> Void, stalledFor: (Duration) -> Void, runsAgain: () -> Void
    ) async {
        var warned = false
        while !Task.isCancelled {
            probe()
            try? await Task.sleep(for: .seconds(1))
            let stalled = self.stalled
            report(stalled)
            if stalled >= warnAfter, !warned {
                warned = true
                stalledFor(stalled)
            } else if warned, stalled < warnAfter / 5 {
                warned = false
                runsAgain()
            }
        }
    }

    // MARK: - The thread

    private func loop() {
        tandem_set_current_loop(UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque()))
        // the kernel's name for the thread (Foundation's `name` is not), so profiles and /proc tell it apart
        tandem_name_thread(name)
        let executor = asUnownedTaskExecutor()
        var batch: [Work] = []
        var ready = [Int32](repeating: -1, count: 64)
        while true {
            lock.lock()
            swap(&batch, &queue)
            let idle = batch.isEmpty
            if idle { parked = true }
            lock.unlock()
            // ready sockets first (a task's exit frees a slot for the work queued below); only a look when work
            // is waiting
            let sleep = sources.isEmpty ? -1 : expireSources()
            let n = tandem_epoll_wait(epoll, &ready, Int32(ready.count), idle ? sleep : 0)
            if idle {
                // awake: what the sources below queue needs no wake-up write
                lock.lock()
                parked = false
                lock.unlock()
            }
            for i in 0..<max(0, Int(n)) {
                if ready[i] == wakeFD {
                    tandem_eventfd_drain(wakeFD)
                } else {
                    sources[ready[i]]?.ready()
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
