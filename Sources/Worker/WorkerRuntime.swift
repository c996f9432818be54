import CeleryWire
import Foundation
import Logging
import Synchronization
import TandemCore

/// The worker: claims jobs of its datacenter with leases, runs them in N slots, renews the leases while they run,
/// records STARTED then SUCCESS or FAILURE, and acks. Stops claiming on SIGTERM and lets running work finish.
///
/// A slot is free again as soon as its task's process has ended: recording the result and acking ("finishing")
/// goes on beside the next task, still under the job's lease (renewed, fenced and acked as before). So a slot's
/// path is claim → start → exit, not claim → start → exit → commit → ack; at most `maxFinishing` jobs finish at
/// once, so a slow Postgres still holds the worker back instead of letting held leases pile up.
public final class WorkerRuntime: Sendable {
    public let configuration: WorkerConfiguration
    let broker: any Broker
    let results: any ResultBackend
    let ledger: any TaskLedger
    let launcher: any TaskLauncher
    let logger: Logger
    let observer: any WorkerObserver
    let revocations: any RevocationSource
    /// The store that records a whole start or end of an attempt in one write (the Postgres store, which keeps
    /// results and ledger together); nil when results and ledger are written one by one.
    let wholeAttempts: (any AttemptStartRecorder)?

    /// A job this worker holds.
    struct Slot {
        var job: ClaimedJob
        var taskID: String?
        var process: (any RunningTask)?
        /// The lease was refused on renewal: another claim may run the task, so this one must stop.
        var leaseLost = false
        /// Shutdown stopped the task: give it back instead of recording a result.
        var stoppedForShutdown = false
        /// The task's process has ended; its result and ack are being recorded. The slot is free for the next task.
        var finishing = false
        /// When it was claimed ahead (`claimAhead`): leased and renewed, not started until a slot frees; given
        /// back once held past `claimAheadHoldLimit`. nil once started (or never held).
        var heldSince: ContinuousClock.Instant?
        var waiting: Bool { heldSince != nil }
        /// When the last request that extended the lease was SENT (the claim, then each renewal). The lease on
        /// Redis runs at least until this + TTL, so a worker that cannot renew stops its task before then.
        var leaseConfirmedAt: ContinuousClock.Instant
        /// Self-fencing found the lease about to lapse after the task had ended (said once; nothing to stop).
        var lapseAfterEndNoted = false
    }

    struct State {
        var slots: [String: Slot] = [:]
        var running: Int { slots.values.count { !$0.finishing && !$0.waiting } }
        var waiting: Int { slots.values.count(where: \.waiting) }
        var finishingCount: Int { slots.values.count(where: \.finishing) }
        var phase: WorkerStatus.State = .running
        /// An operator asked this worker to drain (`executorctl worker drain`): it claims nothing new and reports
        /// itself draining (the dispatcher then counts none of its slots), but keeps running until told otherwise.
        var drainRequested = false
        var slotFreed: AsyncStream<Void>.Continuation?
        /// Jobs this process has claimed; those no longer `running` have freed their slot (what claims report).
        var claimedTotal = 0
        /// (A job held ahead has not freed a slot: the dispatcher counts it busy, as it does a running one.)
        var released: Int { claimedTotal - running - waiting }
        /// The claim loop is blocked waiting for work: a freed slot is not reported by a claim until it wakes.
        var idleWaiting = false
        var reportingReleases = false
        /// `released` as last sent with a claim.
        var reportedReleased = 0
        /// How long this worker's recent tasks ran (seconds, a moving average; nil before the first): claiming
        /// ahead pays only while a held job waits no longer than that for a slot.
        var recentRunSeconds: Double?

        mutating func noteRun(_ seconds: Double) {
            recentRunSeconds = recentRunSeconds.map { 0.75 * $0 + 0.25 * seconds } ?? seconds
        }

        /// Takes the held jobs whose hold began at an instant `matching` accepts out of the slots, so nothing else
        /// (the claim loop starts held jobs too) can start them while they are given back.
        mutating func takeHeld(_ matching: (ContinuousClock.Instant) -> Bool) -> [ClaimedJob] {
            let jobs = slots.values.compactMap { s in s.heldSince.flatMap { matching($0) ? s.job : nil } }
            for j in jobs { slots.removeValue(forKey: j.jobID) }
            return jobs
        }
    }

    let state = Mutex(State())
    /// Starts the deferred writes of attempts' starts (run by `run()`).
    let deferredWrites = DeferredWrites()
    private let slotFreedStream: AsyncStream<Void>
    /// Tells this process's slot counts apart from an earlier process's under the same worker id.
    let incarnation = UUID().uuidString
    /// Counts of what happened, for tests and the heartbeat.
    public let counters = Mutex<[String: Int]>([:])

    public init(
        configuration: WorkerConfiguration, broker: any Broker, results: any ResultBackend, ledger: any TaskLedger,
        launcher: any TaskLauncher, logger: Logger, observer: any WorkerObserver = NoWorkerObserver(),
        revocations: any RevocationSource = NoRevocations()
    ) {
        self.observer = observer
        self.revocations = revocations
        self.configuration = configuration
        self.broker = broker
        self.results = results
        self.ledger = ledger
        self.launcher = launcher
        wholeAttempts = results.recordsFencingInLedger ? ledger as? any AttemptStartRecorder : nil
        var l = logger
        l[metadataKey: "dc"] = .string(configuration.datacenter)
        l[metadataKey: "worker"] = .string(configuration.workerID)
        self.logger = l
        let (stream, cont) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        slotFreedStream = stream
        state.withLock { $0.slotFreed = cont }
    }

    // MARK: - Life cycle

    /// Runs until `shutdown()` (SIGTERM) and the running tasks have finished or the grace period has passed.
    public func run() async throws {
        logger.info(
            "worker started",
            metadata: ["queues": .string(configuration.queues.joined(separator: ",")),
                "concurrency": .stringConvertible(configuration.concurrency)])
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.heartbeatLoop() }
            group.addTask { await self.renewLoop() }
            group.addTask { await self.selfFenceLoop() }
            group.addTask { await self.loopWatch() }
            if configuration.claimAhead > 0 { group.addTask { await self.heldJobWatch() } }
            group.addTask(executorPreference: WorkerLoop.shared) { await self.deferredWrites.run() }
            // the claim loop and every job's path run on the worker loop's thread, which also forks and reaps
            // the tasks' processes: a task's start and end cross no other thread (WorkerLoop)
            await withTaskExecutorPreference(WorkerLoop.shared) { await claimLoop() }
            await giveBackWaiting()
            await drainRunning()
            state.withLock { $0.phase = .stopped }
            _ = try? await broker.heartbeat(status(), ttlSeconds: 60)
            group.cancelAll()
        }
        logger.info("worker stopped")
    }

    /// First SIGTERM: stop claiming; running tasks get `shutdownGrace` to finish.
    public func shutdown() {
        let first = state.withLock { s -> Bool in
            guard s.phase == .running else { return false }
            s.phase = .draining
            return true
        }
        if first {
            logger.info(
                "shutting down: no new claims; running tasks have \(configuration.shutdownGrace.map { "\($0)" } ?? "as long as they take") to finish (send SIGTERM again to stop them now; they are recorded as failed)")
        }
        _ = state.withLock { $0.slotFreed?.yield() }
    }

    /// Second SIGTERM or SIGINT: stop running tasks now (each is recorded FAILURE, as Celery records a task whose
    /// worker was lost); jobs not started yet go back to the queue.
    public func shutdownNow() {
        shutdown()
        logger.warning("stopping now: running tasks are stopped and recorded as failed (Airflow retries those with retries left); jobs claimed but not started go back on the queue")
        stopAllForShutdown()
    }

    /// Celery's revoke: a task not started yet is never started (the RevocationSource says so); a running one is
    /// signalled when `terminate` is set, as `celery worker` does.
    public func revokeRunning(taskID: String, signal: Int32) {
        let procs = state.withLock { s in s.slots.values.filter { $0.taskID == taskID }.compactMap(\.process) }
        for p in procs {
            logger.warning("revoke with terminate: sending signal \(signal) to task \(taskID) (pid \(p.pid))")
            p.signalGroup(signal)
        }
    }

    public var phase: WorkerStatus.State { state.withLock { $0.phase } }
    /// Slots whose task is running (or about to start).
    public var busy: Int { state.withLock { $0.running } }
    /// Jobs this worker holds a lease on: running, plus those whose result is being recorded.
    public var held: Int { state.withLock { $0.slots.count } }
    /// Jobs claimed ahead of a free slot (`--claim-ahead`), leased to this worker but not started yet.
    public var claimedAhead: Int { state.withLock { $0.slots.values.filter(\.waiting).count } }

    func status() -> WorkerStatus {
        var status = state.withLock { s in
            WorkerStatus(
                workerID: configuration.workerID, datacenter: configuration.datacenter,
                slots: configuration.concurrency, busy: s.running, queues: configuration.queues,
                hostname: configuration.hostname, pid: getpid(),
                runningJobs: s.slots.filter { !$0.value.waiting }.map(\.key),
                aheadJobs: s.slots.filter { $0.value.waiting }.map(\.key),
                state: s.phase == .running && s.drainRequested ? .draining : s.phase)
        }
        status.spooledWrites = spooledWrites
        return status
    }

    /// Writes waiting in the local spool for Postgres (for the metrics endpoint).
    public var spooledWrites: Int { ledger.writesWaitingLocally }

    func count(_ key: String) { counters.withLock { $0[key, default: 0] += 1 } }

    // MARK: - Claiming

    private func claimLoop() async {
        var backoff = Duration.milliseconds(100)
        var rotation = 0
        var freed = slotFreedStream.makeAsyncIterator()
        // a claim that failed may have taken jobs on the broker (its reply lost): the retry reuses its id, and the
        // broker answers those jobs again
        var claims = 0
        var unanswered: String?
        while phase == .running {
            let (running, finishing, drained) = state.withLock { ($0.running, $0.finishingCount, $0.drainRequested) }
            if drained {
                // an operator's drain: wait (a freed slot or the drain being lifted wakes this) without claiming
                _ = await freed.next()
                continue
            }
            var free = configuration.concurrency - running
            // back-pressure: when recording falls behind (a slow Postgres), stop taking work until it catches up
            if finishing >= configuration.maxFinishing {
                _ = await freed.next()
                continue
            }
            var want = max(0, free)
            if configuration.claimAhead > 0 {
                // jobs held ahead start first, without a round trip; then top the held ones up — only while this
                // worker's tasks are short: behind long ones a held job would wait while other workers sit idle
                let (started, held) = startWaiting(max: free)
                free -= started
                want = max(0, free)
                if let recent = state.withLock({ $0.recentRunSeconds }), recent < configuration.claimAheadMaxRun.inSeconds {
                    want += max(0, configuration.claimAhead - held)
                }
            }
            if want <= 0 {
                _ = await freed.next()
                continue
            }
            // rotate the queue order so one busy queue cannot starve the others
            let qs = configuration.queues
            let start = rotation % qs.count
            let order = Array(qs[start...] + qs[..<start])
            rotation &+= 1
            do {
                let sentAt = ContinuousClock.now
                claims &+= 1
                let claimID = unanswered ?? "\(incarnation)-\(claims)"
                unanswered = claimID
                let jobs = try await claim(from: order, max: min(want, configuration.claimBatch), claimID: claimID)
                unanswered = nil
                backoff = .milliseconds(100)
                observer.brokerOK()
                if jobs.isEmpty && free <= 0 {
                    // only claiming ahead, and nothing queued: wait for a slot, not for work
                    _ = await freed.next()
                    continue
                }
                if jobs.isEmpty {
                    // a slot freed while blocked here is reported at once (reportReleasedIfIdle), so the
                    // dispatcher can send work to it
                    state.withLock { $0.idleWaiting = true }
                    reportReleasedIfIdle()  // a slot freed while this claim was on its way
                    defer { state.withLock { $0.idleWaiting = false } }
                    try await broker.waitForWork(datacenter: configuration.datacenter, timeout: configuration.idleWait)
                    continue
                }
                observer.claimed(count: jobs.count, datacenter: configuration.datacenter)
                for job in jobs {
                    let ahead = free <= 0
                    state.withLock {
                        $0.slots[job.jobID] = Slot(job: job, heldSince: ahead ? sentAt : nil, leaseConfirmedAt: sentAt)
                        $0.claimedTotal += 1
                    }
                    if !ahead {
                        free -= 1
                        startJob(job)
                    }
                }
                observer.slotsBusy(busy, of: configuration.concurrency)
            } catch {
                observer.brokerError()
                logger.error("cannot claim work: \(error) — retrying in \(backoff)")
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    private func startJob(_ job: ClaimedJob) {
        // runs here until its first wait, instead of waiting for the loop to come round to it
        Task.immediate(executorPreference: WorkerLoop.shared) { await self.execute(job) }
    }

    /// Starts up to `max` jobs held ahead, oldest claim first; returns how many it started and how many are
    /// still held.
    private func startWaiting(max: Int) -> (started: Int, held: Int) {
        let (jobs, held) = state.withLock { s -> ([ClaimedJob], Int) in
            let waiting = s.slots.values.filter(\.waiting).sorted { $0.heldSince! < $1.heldSince! }
            let picked = waiting.prefix(Swift.max(0, max)).map(\.job)
            for j in picked { s.slots[j.jobID]?.heldSince = nil }
            return (picked, waiting.count - picked.count)
        }
        for j in jobs { startJob(j) }
        return (jobs.count, held)
    }

    /// At shutdown: jobs held ahead were never started; they go back to the front of their queue at once (their
    /// attempt refunded) instead of waiting out their leases.
    private func giveBackWaiting() async {
        let jobs = state.withLock { s in s.takeHeld { _ in true } }
        await giveBackHeld(jobs, why: "worker shutting down")
    }

    /// Puts jobs that were held ahead (never started; already out of the slots) back at the front of their queue,
    /// attempt refunded.
    private func giveBackHeld(_ jobs: [ClaimedJob], why: String) async {
        for job in jobs {
            do {
                try await giveBack(job, refund: true, log: logger, why: why)
            } catch {
                logger.error("could not put job \(job.jobID) (claimed ahead, not started) back: \(error) — it runs elsewhere once its lease expires")
            }
        }
    }

    private func drainRunning() async {
        let clock = ContinuousClock()
        let deadline = configuration.shutdownGrace.map { clock.now + $0 }
        var lastReport = clock.now
        while held > 0 {
            if let deadline, clock.now >= deadline {
                logger.warning("shutdown grace of \(configuration.shutdownGrace!) passed with \(busy) task(s) running; stopping them (each is recorded as failed; Airflow retries those with retries left)")
                stopAllForShutdown()
                // wait for the stopped tasks to be recorded
                while held > 0 { try? await Task.sleep(for: .milliseconds(50)) }
                break
            }
            if clock.now - lastReport >= .seconds(60) {
                // waiting without a limit (or a long one): say what it waits for, so a slow stop is not a mystery
                lastReport = clock.now
                logger.notice("shutting down: still waiting for \(busy) running task(s); SIGTERM again stops them now (recorded as failed)")
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    private func stopAllForShutdown() {
        let procs = state.withLock { s -> [any RunningTask] in
            for k in s.slots.keys { s.slots[k]?.stoppedForShutdown = true }
            return s.slots.values.compactMap(\.process)
        }
        stopForShutdown(procs)
    }

    /// SIGTERM to each task's group now (Airflow runs the operator's on_kill), SIGKILL after `killTimeout`.
    private func stopForShutdown(_ procs: [any RunningTask]) {
        for p in procs { p.signalGroup(SIGTERM) }
        let kill = configuration.killTimeout
        if !procs.isEmpty {
            Task {
                try? await Task.sleep(for: kill)
                for p in procs { p.signalGroup(SIGKILL) }
            }
        }
    }

    // MARK: - Leases and heartbeats

    private func renewLoop() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: configuration.renewInterval)
            if Task.isCancelled { return }
            await renewOnce()
        }
    }

    /// Renews every lease held; a refused renewal means the job was reclaimed, so its task is stopped at once.
    func renewOnce() async {
        let held = state.withLock { s in s.slots.values.filter { !$0.leaseLost }.map { ($0.job.jobID, $0.job.token) } }
        if held.isEmpty { return }
        let sentAt = ContinuousClock.now
        do {
            let ok = try await broker.renew(
                workerID: configuration.workerID, jobs: held.map { (jobID: $0.0, token: $0.1) },
                leaseMs: configuration.leaseTTL.inMilliseconds)
            observer.leaseRenewals(renewed: ok.filter { $0 }.count, refused: ok.filter { !$0 }.count)
            state.withLock { s in
                for ((jobID, _), renewed) in zip(held, ok) where renewed { s.slots[jobID]?.leaseConfirmedAt = sentAt }
            }
            for ((jobID, _), renewed) in zip(held, ok) where !renewed {
                let proc = state.withLock { s -> (any RunningTask)? in
                    guard s.slots[jobID] != nil else { return nil }
                    s.slots[jobID]?.leaseLost = true
                    return s.slots[jobID]?.process
                }
                count("lease_lost")
                logger.warning("lease on job \(jobID) was reclaimed by another worker; stopping its task (it may run elsewhere now)")
                proc?.signalGroup(SIGKILL)
            }
        } catch {
            observer.brokerError()
            logger.error("cannot renew leases: \(error) — tasks keep running; retrying in \(configuration.renewInterval)")
        }
    }

    /// Self-fencing: a lease this worker could not renew in time (Redis unreachable, a partition) may be reclaimed
    /// by another datacenter as soon as it expires. Stop the task before that moment, so the task never runs in
    /// two places at once even when this worker cannot hear that it lost the lease.
    private func selfFenceLoop() async {
        let ttl = configuration.leaseTTL
        let margin = min(Duration.seconds(2), ttl / 10)
        while !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(250))
            let now = ContinuousClock.now
            let (expiring, ended) = state.withLock { s -> ([(String, (any RunningTask)?)], [String]) in
                var expiring: [(String, (any RunningTask)?)] = []
                var ended: [String] = []
                for (id, slot) in s.slots where !slot.leaseLost && now - slot.leaseConfirmedAt > ttl - margin {
                    if slot.finishing {
                        // nothing left to stop, and its result is true: it still goes out, and the fences (the
                        // ledger's token, ack.lua) refuse it if another claim has taken the job meanwhile
                        if !slot.lapseAfterEndNoted { ended.append(id) }
                        s.slots[id]?.lapseAfterEndNoted = true
                        continue
                    }
                    s.slots[id]?.leaseLost = true
                    expiring.append((id, slot.process))
                }
                return (expiring, ended)
            }
            for jobID in ended {
                logger.warning(
                    "could not renew the lease on job \(jobID) before it expires; its task has already ended — its result is written and acked once Redis and Postgres answer, unless another worker has taken the job by then")
            }
            for (jobID, proc) in expiring {
                count("self_fenced")
                logger.error(
                    "could not renew the lease on job \(jobID) before it expires; stopping its task so it cannot run twice (another worker will retry it)")
                proc?.signalGroup(SIGKILL)
            }
        }
    }

    /// A job held ahead that a slot has not taken within `claimAheadHoldLimit` (tasks turned long) goes back to the
    /// front of its queue, attempt refunded, where any worker of the datacenter can take it; claiming ahead then
    /// stops until this worker's tasks are short again.
    private func heldJobWatch() async {
        let limit = configuration.claimAheadHoldLimit
        while !Task.isCancelled && phase == .running {
            try? await Task.sleep(for: min(limit / 4, .milliseconds(500)))
            let now = ContinuousClock.now
            let stale = state.withLock { s -> [ClaimedJob] in
                let jobs = s.takeHeld { now - $0 >= limit }
                // tasks turned long: no more claiming ahead until recent ones are short again
                if !jobs.isEmpty { s.recentRunSeconds = max(s.recentRunSeconds ?? 0, configuration.claimAheadMaxRun.inSeconds) }
                return jobs
            }
            for job in stale {
                logger.info("job \(job.jobID) held ahead for \(limit) behind running tasks; putting it back for any worker")
                count("held_given_back")
            }
            if !stale.isEmpty { observer.claimedAheadGivenBack(count: stale.count) }
            await giveBackHeld(stale, why: "held \(limit) behind running tasks")
        }
    }

    /// Every task starts, ends and is recorded through the worker loop; held up, it leaves tasks unstarted and
    /// finished tasks unreaped and unrecorded (their leases are still renewed, and self-fencing still acts, from
    /// the pool). Says so, once per stall, and reports it as a metric.
    private func loopWatch() async {
        await WorkerLoop.shared.watchStalls(
            warnAfter: configuration.loopStallWarning,
            report: { observer.loopStalled(seconds: $0.inSeconds) },
            stalledFor: { stalled in
                count("loop_stalled")
                logger.error(
                    "the worker loop has not run for \(stalled): no task starts, ends or is recorded meanwhile — is the worker's log output blocked (a full pipe, a stopped reader)? A stack dump (gdb -p \(getpid()), thread 'tandem-loop') shows where it waits")
            },
            runsAgain: { logger.notice("the worker loop runs again") })
    }

    private func heartbeatLoop() async {
        while !Task.isCancelled {
            do {
                _ = try await broker.heartbeat(status(), ttlSeconds: 3600)
                observer.brokerOK()
                if try await followDrainRequest() { continue }  // changed: say so in a heartbeat at once
            } catch {
                observer.brokerError()
                logger.error("cannot send heartbeat: \(error)")
            }
            try? await Task.sleep(for: configuration.heartbeatInterval)
        }
    }

    /// Follows an operator's `executorctl worker drain` / `restore`; returns true when the state changed. Draining
    /// gives jobs claimed ahead (not started) back to their queue at once, for another worker.
    private func followDrainRequest() async throws -> Bool {
        let asked = try await broker.drainRequested(workerID: configuration.workerID)
        let changed = state.withLock { s -> Bool in
            guard s.drainRequested != asked else { return false }
            s.drainRequested = asked
            s.slotFreed?.yield()
            return true
        }
        guard changed else { return false }
        if asked {
            logger.notice("drained by an operator (executorctl worker drain): claiming nothing new; \(busy) running task(s) finish; executorctl worker restore \(configuration.workerID) undoes it")
            let held = state.withLock { s in s.takeHeld { _ in true } }
            await giveBackHeld(held, why: "worker drained by an operator")
        } else {
            logger.notice("drain lifted (executorctl worker restore): claiming again")
        }
        return true
    }

    // MARK: - Running one job

    private func finish(_ jobID: String) {
        let busy = state.withLock { s in
            s.slots[jobID] = nil
            s.slotFreed?.yield()
            return s.running
        }
        observer.slotsBusy(busy, of: configuration.concurrency)
        reportReleasedIfIdle()
    }

    /// The task's process is gone: free its slot — the claim loop takes the next job while this one's result is
    /// recorded — and forget the pid, which the kernel may hand to another process from now on. Runs as the
    /// process is reaped (on the worker loop; a runner's task: on the thread that hears of its exit); and again,
    /// to no effect, when the job's own path sees the end. Returns the slot.
    private func processEnded(_ jobID: String) -> Slot? {
        let (slot, changed, busy) = state.withLock { s -> (Slot?, Bool, Int) in
            let changed = s.slots[jobID].map { !$0.finishing } ?? false
            if changed {
                s.slots[jobID]?.finishing = true
                s.slots[jobID]?.process = nil
                s.slotFreed?.yield()
            }
            return (s.slots[jobID], changed, s.running)
        }
        if changed {
            observer.slotsBusy(busy, of: configuration.concurrency)
            reportReleasedIfIdle()
        }
        return slot
    }

    /// Claims up to `max` jobs (0: none) and, with them, tells the broker how many of this process's claimed jobs
    /// have freed their slot.
    private func claim(from queues: [String], max: Int, claimID: String? = nil) async throws -> [ClaimedJob] {
        let released = state.withLock { s in
            s.reportedReleased = s.released
            return s.released
        }
        return try await broker.claim(
            workerID: configuration.workerID, datacenter: configuration.datacenter, queues: queues, max: max,
            leaseMs: configuration.leaseTTL.inMilliseconds,
            slots: SlotReport(incarnation: incarnation, released: released, claimID: claimID))
    }

    /// While the claim loop waits for work, nothing else would tell the broker that a slot is free again: report
    /// it with an empty claim, so the dispatcher counts the slot as free now rather than at the next claim. One
    /// report in flight at a time; what freed meanwhile goes in the next.
    private func reportReleasedIfIdle() {
        let go = state.withLock { s -> Bool in
            guard s.idleWaiting, !s.reportingReleases, s.released > s.reportedReleased else { return false }
            s.reportingReleases = true
            return true
        }
        guard go else { return }
        // on the loop, where every other claim of this worker is made
        Task(executorPreference: WorkerLoop.shared) { [self] in
            while true {
                do {
                    _ = try await claim(from: configuration.queues, max: 0)
                } catch {
                    // the next claim reports it; the dispatcher meanwhile counts the slot as busy (the safe side)
                    logger.debug("cannot report a freed slot: \(error)")
                }
                let again = state.withLock { s -> Bool in
                    if s.idleWaiting && s.released > s.reportedReleased { return true }
                    s.reportingReleases = false
                    return false
                }
                if !again { return }
            }
        }
    }

    func execute(_ job: ClaimedJob) async {
        defer { finish(job.jobID) }
        var log = logger
        log[metadataKey: "job"] = .string(job.jobID)
        log[metadataKey: "queue"] = .string(job.queue)
        log[metadataKey: "attempt"] = .stringConvertible(job.attempts)

        // 1. Only the two Airflow shapes run; anything else is dead-lettered with a FAILURE and never executed.
        let task: CeleryTask
        let payload: AirflowPayload
        do {
            task = try CeleryTask.decode(raw: job.raw)
            payload = try AirflowPayload.classify(task)
        } catch {
            await reject(job, taskID: (try? CeleryTask.decode(raw: job.raw))?.id, reason: "\(error)", log: log)
            return
        }
        log[metadataKey: "task_id"] = .string(task.id)
        state.withLock { $0.slots[job.jobID]?.taskID = task.id }
        let fence = Fence(jobID: job.jobID, token: job.token)
        let facts = TaskFacts(
            taskID: task.id, taskName: task.name, kind: payload.kindName, workerID: configuration.workerID,
            hostname: configuration.hostname)

        do {
            // 2. The ledger records the claim; a newer claim of the same task already there means this one is
            //    stale. A store that records the whole start of an attempt in one write does it after the launch
            //    (one commit on the task's path instead of two) and stops the task if the claim turns out stale.
            let startRecorder = wholeAttempts
            var claimRecorded = false
            func recordClaim() async throws -> Bool {
                if claimRecorded { return true }
                claimRecorded = true
                guard try await ledger.claimed(job, facts: facts) == .fenced else { return true }
                log.warning("ledger holds a newer claim for this task; this copy is stale and does not run")
                return false
            }
            if startRecorder == nil, try await !recordClaim() { return }

            // 3. Revoked or expired messages are REVOKED, never run (Celery does the same).
            //    (The claim says whether any revoke is in force; with none, asking would only cost a round trip.)
            let revoked = job.mayBeRevoked ? await revocations.isRevoked(task.id) : revocations.isRevokedLocally(task.id)
            if revoked || (task.expires.map { $0 < Date() } ?? false) {
                let why = revoked ? "revoked" : "expired at \(task.expires!)"
                if try await !recordClaim() { return }
                _ = try await results.store(
                    ResultRecord(taskId: task.id, state: .revoked, result: .null, traceback: nil, dateDone: Date()),
                    fence: fence)
                try await ledger.finished(job, taskID: task.id, outcome: "REVOKED", exitStatus: nil, detail: why)
                _ = try await ackWithRetry(job, log: log)
                count("revoked")
                log.info("task not run: \(why)")
                observer.taskFinished(
                    queue: job.queue, datacenter: job.datacenter, outcome: "REVOKED", runSeconds: 0,
                    queueWaitSeconds: queueWait(job))
                return
            }
            if let eta = task.eta, eta > Date() {
                try? await Task.sleep(for: .seconds(eta.timeIntervalSinceNow))
            }
            if state.withLock({ $0.slots[job.jobID]?.stoppedForShutdown ?? false }) {
                try await giveBack(job, refund: true, log: log)
                return
            }
            if state.withLock({ $0.slots[job.jobID]?.leaseLost ?? false }) {
                log.warning("lease lost before the task started; not starting it")
                try await ledger.event(
                    taskID: task.id, jobID: job.jobID, event: "fenced", worker: configuration.workerID,
                    datacenter: configuration.datacenter, token: job.token, detail: "lease lost before start; not started")
                return
            }

            // 4. Start the task, then record STARTED with its pid (what Celery's track_started writes).
            let launched: LaunchedTask
            do {
                launched = try await launcher.launch(payload, taskID: task.id)
            } catch let notStarted as TaskNotStarted where job.attempts < configuration.launchAttempts || phase != .running {
                // the runner died or is restarting, or this worker is stopping: not the task's failure, so it gets
                // another try (anywhere in the datacenter); the attempt counts unless the worker is stopping
                log.warning("task did not start (\(notStarted)); putting it back for another try (attempt \(job.attempts) of \(configuration.launchAttempts))")
                try await giveBack(job, refund: phase != .running, log: log, why: "\(notStarted)")
                return
            } catch {
                log.error("task could not start: \(error)")
                try await record(job, task: task, state: .failure, exit: nil, detail: "\(error)", fence: fence, runSeconds: 0, log: log)
                return
            }
            defer { for f in launched.cleanup { unlink(f) } }
            // a stop that came while the launch was under way found no process to signal: signal it now
            let stopping = state.withLock { s -> Bool in
                s.slots[job.jobID]?.process = launched.process
                return s.slots[job.jobID]?.stoppedForShutdown ?? false
            }
            if stopping { stopForShutdown([launched.process]) }
            launched.process.onEnd { [self] _ in _ = processEnded(job.jobID) }
            log.info("task started", metadata: ["pid": .stringConvertible(launched.process.pid)])
            let startedRecord = ResultRecord(
                taskId: task.id, state: .started,
                result: .object(JSONObject([
                    ("pid", .int(Int64(launched.process.pid))), ("hostname", .string(configuration.hostname)),
                ])), traceback: nil, dateDone: nil)
            let pid = launched.process.pid
            let startLog = log
            let recordWholeStart = { @Sendable () async in
                guard let startRecorder else { return }
                let began = try? await startRecorder.began(job, facts: facts, pid: pid, started: startedRecord)
                if began == .fenced {
                    startLog.warning("ledger holds a newer claim for this task; stopping this stale copy")
                    // only while it runs: once reaped, its pid may belong to someone else
                    let running = self.state.withLock { s -> (any RunningTask)? in
                        s.slots[job.jobID]?.leaseLost = true
                        return s.slots[job.jobID]?.process
                    }
                    running?.signalGroup(SIGKILL)
                }
            }
            // A store that records the whole start in one write waits `startRecordDelay` first: a task that ends
            // sooner has its start and end written together (one commit per task, not two), and Airflow does
            // not act on STARTED. Otherwise STARTED and the ledger's start are written now.
            let startWrite: DeferredWrite
            if startRecorder != nil && !claimRecorded {
                startWrite = deferredWrites.schedule(after: configuration.startRecordDelay, recordWholeStart)
            } else {
                startWrite = DeferredWrite(now: {
                    _ = try? await self.results.store(startedRecord, fence: fence)
                    try? await self.ledger.started(job, taskID: task.id, pid: pid)
                })
            }

            // 5. Wait, enforcing the message's soft and hard time limits.
            let runStart = ContinuousClock.now
            let termination = await waitWithLimits(launched.process, task: task, log: log)
            let ran = ContinuousClock.now - runStart
            let runSeconds = ran.inSeconds
            state.withLock { $0.noteRun(runSeconds) }
            // (the slot was freed as the process was reaped: `processEnded`)
            let atExit = processEnded(job.jobID)
            let doneAt = Date()
            // true: the start was never written (the task was quick); the end below writes both at once
            var startUnwritten = await startWrite.cancelUnlessStarted()
            let duplicate: Bool
            if case .workload = payload, termination == .exited(TaskExit.alreadyRunning) { duplicate = true } else { duplicate = false }
            if startUnwritten, duplicate || state.withLock({ $0.slots[job.jobID]?.leaseLost }) == true {
                // the rarer endings below record their own events; they need the start on record first
                await recordWholeStart()
                startUnwritten = false
            }

            // re-read: the start write may have found this claim stale, and renewals go on while finishing
            let slot = state.withLock { $0.slots[job.jobID] }
            if slot?.leaseLost == true {
                try await ledger.event(
                    taskID: task.id, jobID: job.jobID, event: "fenced", worker: configuration.workerID,
                    datacenter: configuration.datacenter, token: job.token,
                    detail: "lease reclaimed while running; task stopped (\(termination)); no result written")
                count("fenced")
                observer.fenced(queue: job.queue, datacenter: job.datacenter)
                return
            }
            if duplicate {
                // Airflow 3 answered 409: this task instance is already running elsewhere (a duplicate delivery).
                // Writing a FAILURE would make the scheduler fail the healthy run (apache/airflow#58441): ack only.
                log.warning("task instance is already running elsewhere (Execution API 409); acked without a result")
                try await ledger.finished(
                    job, taskID: task.id, outcome: "DUPLICATE", exitStatus: termination.status,
                    detail: "TaskAlreadyRunningError: acked with no result")
                _ = try await ackWithRetry(job, log: log)
                count("duplicate")
                return
            }
            // A task the worker's own stop ended (second SIGTERM, or the shutdown grace ran out) is recorded like
            // any other ending, as Celery records a task whose worker was lost: its try has started, and Airflow
            // runs a started try only once (a copy put back would be refused: Execution API 409, or "already
            // running"), so only a result lets Airflow fail it or start its retry now instead of after its
            // heartbeat timeout (Protocol/SPEC.md, decision 30). One that finished in time keeps its SUCCESS.
            let ok = termination == .exited(0)
            let stopped = atExit?.stoppedForShutdown == true
            if stopped { log.warning("task stopped by the worker's shutdown (\(termination)); recorded \(ok ? "SUCCESS: it finished" : "FAILURE"), not put back") }
            try await record(
                job, task: task, state: ok ? .success : .failure, exit: termination.status,
                detail: ok ? nil : stopped
                    ? "stopped by the worker's shutdown before it finished (task \(termination)): Airflow retries it if it has retries left"
                    : "task \(termination)" + (timeLimitNote(termination, task) ?? ""), fence: fence,
                runSeconds: runSeconds, doneAt: doneAt,
                unwrittenStart: startUnwritten ? (facts, pid, startedRecord) : nil, log: log)
        } catch {
            // Postgres or Redis failed mid-way: the lease stays, expires, and the job is reclaimed and retried.
            observer.storeError()
            log.error("could not finish recording the task: \(error) — its lease will expire and it will be retried")
            count("record_error")
        }
    }

    /// A FAILURE's `result` as Celery's readers rebuild it (`AsyncResult.get()` raises `RuntimeError(detail)`);
    /// never a bare string, which breaks Airflow's fetch batch. The database backend stores NULL regardless
    /// (`ResultRecord.databaseResult()`), as celery 5.7's reader requires.
    static func failureResult(_ s: CeleryState, _ detail: String?) -> JSONValue {
        guard s == .failure else { return .null }
        return .object(JSONObject([
            ("exc_type", .string("RuntimeError")), ("exc_message", .array([.string(detail ?? "task failed")])),
            ("exc_module", .string("builtins")),
        ]))
    }

    /// Dispatch → claim, both on Redis's clock.
    private func queueWait(_ job: ClaimedJob) -> Double {
        let claimedAt = job.leaseDeadlineMs - configuration.leaseTTL.inMilliseconds
        return max(0, Double(claimedAt - job.dispatchedAtMs) / 1000)
    }

    private func timeLimitNote(_ t: ChildProcess.Termination, _ task: CeleryTask) -> String? {
        guard case .signalled = t, task.hardTimeLimit != nil || task.softTimeLimit != nil else { return nil }
        return " (time limit: soft \(task.softTimeLimit.map { "\($0)s" } ?? "none"), hard \(task.hardTimeLimit.map { "\($0)s" } ?? "none"))"
    }

    /// Soft limit: SIGTERM to the task's process group; hard limit: SIGKILL.
    private func waitWithLimits(_ p: any RunningTask, task: CeleryTask, log: Logger) async -> ChildProcess.Termination {
        // no limits (Airflow sets none): no task group, whose child task would cost a pool wake-up per task
        if (task.softTimeLimit ?? 0) <= 0 && (task.hardTimeLimit ?? 0) <= 0 { return await p.wait() }
        return await withTaskGroup(of: ChildProcess.Termination?.self) { group in
            group.addTask { await p.wait() }
            if let soft = task.softTimeLimit, soft > 0 {
                group.addTask {
                    try? await Task.sleep(for: .milliseconds(Int64(soft * 1000)))
                    if !Task.isCancelled {
                        log.warning("soft time limit \(soft)s exceeded; sending SIGTERM to the task")
                        p.signalGroup(SIGTERM)
                    }
                    return nil
                }
            }
            if let hard = task.hardTimeLimit, hard > 0 {
                group.addTask {
                    try? await Task.sleep(for: .milliseconds(Int64(hard * 1000)))
                    if !Task.isCancelled {
                        log.warning("hard time limit \(hard)s exceeded; sending SIGKILL to the task")
                        p.signalGroup(SIGKILL)
                    }
                    return nil
                }
            }
            var result: ChildProcess.Termination = .exited(-1)
            for await r in group {
                if let r {
                    result = r
                    group.cancelAll()
                }
            }
            return result
        }
    }

    /// Writes the final result (fenced), then acks, then closes the ledger row. `unwrittenStart`: the attempt's
    /// start is not on record yet (a quick task); it is written in the same transaction, ahead of the end.
    private func record(
        _ job: ClaimedJob, task: CeleryTask, state s: CeleryState, exit: Int32?, detail: String?, fence: Fence,
        runSeconds: Double, doneAt: Date = Date(), unwrittenStart: (TaskFacts, Int32, ResultRecord)? = nil,
        log: Logger
    ) async throws {
        let rec = ResultRecord(taskId: task.id, state: s, result: Self.failureResult(s, detail), traceback: detail, dateDone: doneAt)
        // With a Postgres result backend the result and the ledger's end of attempt are one write (one statement,
        // one commit shared with other tasks' writes) instead of two.
        let outcome: ResultWriteOutcome
        var ledgerDone = false
        if let whole = wholeAttempts {
            if let (facts, pid, started) = unwrittenStart {
                outcome = try await whole.ranAndEnded(
                    job, facts: facts, pid: pid, started: started, result: rec, outcome: s.rawValue, exitStatus: exit,
                    detail: detail)
            } else {
                outcome = try await whole.ended(job, result: rec, outcome: s.rawValue, exitStatus: exit, detail: detail)
            }
            ledgerDone = true
        } else {
            outcome = try await results.store(rec, fence: fence)
        }
        switch outcome {
        case .fenced:
            log.warning("result refused: the lease was reclaimed; another attempt owns this task")
            count("fenced")
            observer.fenced(queue: job.queue, datacenter: job.datacenter)
            if results.recordsFencingInLedger { return }
            try await ledger.event(
                taskID: task.id, jobID: job.jobID, event: "fenced", worker: configuration.workerID,
                datacenter: configuration.datacenter, token: job.token,
                detail: "late \(s.rawValue) refused: lease reclaimed")
            return
        case .keptSuccess:
            log.info("a SUCCESS was already recorded for this task; kept it")
        case .written:
            break
        }
        if !ledgerDone {
            try await ledger.finished(job, taskID: task.id, outcome: s.rawValue, exitStatus: exit, detail: detail)
        }
        let acked = try await ackWithRetry(job, log: log)
        if acked == .doneLate {
            // cut off past its lease (a partition, a pause), this worker's task still finished first: nobody else has
            // started it, so its result stands and the copy waiting in the queue is dropped
            log.notice("acked after the lease had expired; the job was waiting to be retried and is now removed — the task ran once")
            try await ledger.event(
                taskID: task.id, jobID: job.jobID, event: "acked-late", worker: configuration.workerID,
                datacenter: configuration.datacenter, token: job.token,
                detail: "acked after its lease expired, before any other claim; its queued retry was removed")
        }
        if acked == .fenced {
            try await ledger.event(
                taskID: task.id, jobID: job.jobID, event: "fenced", worker: configuration.workerID,
                datacenter: configuration.datacenter, token: job.token, detail: "ack refused: lease reclaimed")
            count("fenced")
            observer.fenced(queue: job.queue, datacenter: job.datacenter)
            return
        }
        count(s.rawValue.lowercased())
        observer.taskFinished(
            queue: job.queue, datacenter: job.datacenter, outcome: s.rawValue, runSeconds: runSeconds,
            queueWaitSeconds: queueWait(job))
        log.info("task finished", metadata: ["state": .string(s.rawValue)])
    }

    /// Acks, retrying through a broker outage. Past the lease the job may be reclaimed, but an ack that lands before
    /// any other claim takes it is still accepted (ack.lua's late ack), and the finished task then does not run
    /// again — so a running worker keeps trying for `ackRetryLimit`; one that is stopping, for one lease period.
    /// A retry refused because the job is gone, after an attempt whose reply was lost, is that attempt's ack having
    /// landed — not a reclaimed lease (which leaves the job on the broker under a newer claim).
    private func ackWithRetry(_ job: ClaimedJob, log: Logger) async throws -> FencedOutcome {
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start + max(configuration.leaseTTL, WorkerConfiguration.ackRetryLimit)
        var wait = Duration.milliseconds(100)
        var uncertain = false
        while true {
            do {
                let outcome = try await broker.ack(jobID: job.jobID, token: job.token)
                if outcome == .fenced, uncertain, try await !broker.jobExists(jobID: job.jobID) {
                    log.notice("the ack's first reply was lost and the job is gone: that ack landed")
                    return .done
                }
                return outcome
            } catch {
                uncertain = true
                if clock.now >= deadline || (phase != .running && clock.now >= start + configuration.leaseTTL) { throw error }
                log.error("cannot ack: \(error) — retrying in \(wait)")
                try? await Task.sleep(for: wait)
                wait = min(wait * 2, .seconds(2))
            }
        }
    }

    private func giveBack(_ job: ClaimedJob, refund: Bool, log: Logger, why: String = "worker shutting down") async throws {
        let r = try await broker.requeue(jobID: job.jobID, token: job.token, refundAttempt: refund)
        if let taskID = state.withLock({ $0.slots[job.jobID]?.taskID }) {
            try? await ledger.event(
                taskID: taskID, jobID: job.jobID, event: r == .done ? "requeued" : "fenced",
                worker: configuration.workerID, datacenter: configuration.datacenter, token: job.token,
                detail: r == .done ? "\(why); put back at the front of its queue" : "requeue refused: lease reclaimed")
        }
        log.info(r == .done ? "put back on the queue for another worker" : "could not put back: lease already reclaimed")
        count("requeued")
    }

    /// A message that is not one of Airflow's two task shapes: dead-lettered with its reason, FAILURE recorded
    /// when it has a task id, never executed.
    private func reject(_ job: ClaimedJob, taskID: String?, reason: String, log: Logger) async {
        log.error("rejected message: \(reason) — dead-lettered, not executed")
        do {
            if let taskID, !taskID.isEmpty {
                _ = try await results.store(
                    ResultRecord(
                        taskId: taskID, state: .failure, result: Self.failureResult(.failure, reason),
                        traceback: "Tandem refused to run this message: \(reason)", dateDone: Date()),
                    fence: nil)
                try await ledger.event(
                    taskID: taskID, jobID: job.jobID, event: "dead", worker: configuration.workerID,
                    datacenter: configuration.datacenter, token: job.token, detail: reason)
            }
            _ = try await broker.deadLetter(jobID: job.jobID, token: job.token, reason: reason)
            count("dead")
            observer.deadLettered(queue: job.queue, datacenter: job.datacenter)
        } catch {
            log.error("could not confirm the dead-letter: \(error) — if it did not land, the lease expires and the message is rejected again on its next claim (nothing runs either way)")
        }
    }
}

/// Exit statuses with a meaning beyond success/failure (Protocol/RUNNER.md).
public enum TaskExit {
    /// Airflow 3: `TaskAlreadyRunningError` — the Execution API answered 409; write no result.
    public static let alreadyRunning: Int32 = 75
    /// Airflow 3: the Execution API refused the token (expired); the task never started. FAILURE.
    public static let tokenRefused: Int32 = 77
    /// The Airflow runner died while the task ran. FAILURE.
    public static let runnerDied: Int32 = 70
}

extension AirflowPayload {
    /// "command" (Airflow 2) or the workload type (Airflow 3).
    public var kindName: String {
        switch self {
        case .command: return "command"
        case .workload(let w): return w.kind
        }
    }
}
