import ClientSupport
import Foundation
import Logging
import Redis
import Synchronization
import TandemCore
import TandemRedis

public struct DispatcherConfiguration: Sendable {
    public var policy: RoutingPolicy
    /// Ingress queues to move even when no worker advertises them yet (the policy's queues are always watched).
    public var queues: [String]
    /// A datacenter whose workers have all been silent this long is lost.
    public var dcLossAfter: Duration = .seconds(15)
    /// Jobs claimed this many times whose lease expires again go to the dead-letter queue.
    public var maxAttempts: Int = 3
    /// Most messages moved per script call.
    public var batch: Int = 500
    /// The most a datacenter queue may hold beyond its idle slots (as a multiple of its slots).
    public var prefetchFactor: Int = 16
    /// Below that cap, a datacenter queue holds what its workers claim in this long (their claim rate times it):
    /// enough that a slot that frees finds its next job already there, while a job queued behind busy slots
    /// waits about this long, not a whole task, when another datacenter could run it. Slow tasks get no prefetch.
    public var prefetchWindow: Duration = .milliseconds(20)
    public var reclaimInterval: Duration = .seconds(1)
    /// After this dispatcher could not reach Redis, how long it waits once Redis answers before taking back expired
    /// leases: workers back from the same outage ack what finished meanwhile first (their acks retry every 2 s at
    /// most), so those tasks do not run again. A lease whose worker died waits this much longer.
    public var reclaimGraceAfterOutage: Duration = .seconds(5)
    public var healthInterval: Duration = .milliseconds(500)
    /// How long an idle dispatcher blocks waiting for Airflow to publish (per queue, rotating) before it looks at
    /// everything again (priority lists, health, reclaims).
    public var idleWait: Duration = .milliseconds(100)
    /// With work waiting and no room anywhere: the longest wait for a claim (which also reports freed slots) to
    /// make room before looking again.
    public var capacityWait: Duration = .milliseconds(20)
    /// This dispatcher's id in the leader lease.
    public var dispatcherID: String
    /// The leader lease; a standby takes over at most this long (plus one check) after the leader dies.
    public var leaderLease: Duration = .seconds(5)
    public var leaderCheck: Duration = .seconds(1)
    /// A dispatcher loop (`run(on:)`) that has not run for this long is logged once and reported not ready.
    public var loopStallWarning: Duration = .seconds(5)
    /// How often the leader looks at what is slower to read than the dispatch cycle's own keys: every declared
    /// queue, for stranded work (messages in Airflow's lists that no live worker, or no datacenter the policy
    /// allows, can take; `tandem_ingress_stranded`), and Redis's memory against its maxmemory.
    public var wideLookInterval: Duration = .seconds(10)
    /// A queue still stranded is logged again this often (and once when it clears).
    public var strandedRepeat: Duration = .seconds(300)
    /// `SCAN` pages (1,000 keys each) per look for declared queues: a look costs at most this many round trips
    /// however large the keyspace; a million keys take ~60 looks (10 minutes) for a full pass.
    public var declaredScanPages = DeclaredQueueScan.pagesPerLook

    public init(policy: RoutingPolicy, queues: [String], dispatcherID: String? = nil) {
        self.policy = policy
        self.queues = queues
        self.dispatcherID = dispatcherID ?? "dispatcher@\(ProcessInfo.processInfo.hostName):\(getpid())"
    }
}

/// The dispatcher: moves Celery messages from kombu's ingress lists into datacenter queues by routing policy and
/// datacenter health, reclaims expired leases, and moves the queued work of lost datacenters to survivors.
public final class DispatcherRuntime: Sendable {
    public let configuration: DispatcherConfiguration
    let broker: RedisBroker
    let inspector: BrokerInspector
    let logger: Logger
    let observer: any DispatcherObserver
    private let stopping = Mutex(false)
    /// The leader epoch while this dispatcher leads; nil while it is a standby.
    private let epochBox = Mutex<Int64?>(nil)
    public var epoch: Int64? { epochBox.withLock { $0 } }
    /// Counters for tests and logs: dispatched, reclaimed, dead, rebalanced.
    public let counters = Mutex<[String: Int]>([:])
    /// The refill marks last written to `{tandem}:refill` (datacenter queue key -> depth), to write only changes.
    private let refillMarks = Mutex<[String: Int]>([:])
    /// Each datacenter's claim rate, measured from its workers' claim counts (for the prefetch).
    private let claimRates = Mutex<[String: ClaimRate]>([:])
    /// What the stranded-work check remembers between looks.
    private let strandedState = Mutex(StrandedState())

    struct StrandedState {
        /// Queues found stranded at the last look: a queue counts only when two looks in a row find it, so a
        /// worker that is starting (not yet heartbeating) or a dispatcher that just took the lead raises nothing.
        var seen: Set<String> = []
        /// Queues logged as stranded: queue -> (reason, when), to log on change and then every `strandedRepeat`.
        var logged: [String: (reason: String, at: ContinuousClock.Instant)] = [:]
    }
    /// Redis was at or above 90% of its maxmemory at the last look (warned once per crossing).
    private let redisMemoryHigh = Mutex(false)
    /// The pass over the keyspace that finds declared queues, a few pages per look (`declaredScanPages`).
    private let declaredScan = Mutex(DeclaredQueueScan())
    /// When Celery's reservations were last logged (nil: none are held), to repeat every `strandedRepeat`.
    private let celeryReservedLogged = Mutex<ContinuousClock.Instant?>(nil)

    struct ClaimRate {
        var since: ContinuousClock.Instant
        var claimedThen: Int
        var perSecond: Double = 0
    }

    public init(
        configuration: DispatcherConfiguration, broker: RedisBroker, logger: Logger,
        observer: any DispatcherObserver = NoDispatcherObserver()
    ) {
        self.observer = observer
        self.configuration = configuration
        self.broker = broker
        self.inspector = BrokerInspector(client: broker.client)
        self.logger = logger
    }

    public func shutdown() { stopping.withLock { $0 = true } }
    private var isStopping: Bool { stopping.withLock { $0 } }

    /// What the dispatcher knows about the datacenters at one moment.
    struct View {
        var states: [String: DatacenterState] = [:]
        var workers: [WorkerStatus] = []
        var live: Set<String> { Set(states.values.filter(\.acceptsWork).map(\.name)) }
    }

    /// Runs the cycle on `loop` (the thread that drives the broker's connections, see `EventLoopThread`) until
    /// `shutdown()`, while the pool watches that the loop keeps running: held up, nothing is dispatched,
    /// reclaimed or drained.
    public func run(on loop: EventLoopThread) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await loop.watchStalls(
                    warnAfter: self.configuration.loopStallWarning,
                    report: { self.observer.loopStalled(seconds: $0.inSeconds) },
                    stalledFor: { stalled in
                        self.logger.error(
                            "the dispatcher loop has not run for \(stalled): nothing is dispatched, reclaimed or drained meanwhile — is the dispatcher's log output blocked (a full pipe, a stopped reader)? A stack dump (gdb -p \(getpid()), thread '\(loop.name)') shows where it waits; a standby dispatcher takes over only if this one stops renewing its lease")
                    },
                    runsAgain: { self.logger.notice("the dispatcher loop runs again") })
            }
            await withTaskExecutorPreference(loop) { await self.run() }
            group.cancelAll()
        }
    }

    public func run() async {
        logger.info("dispatcher started", metadata: ["policy": .string("\(configuration.policy.rules.count) queue rule(s)")])
        let clock = ContinuousClock()
        var view = View()
        var lastHealth = clock.now - configuration.healthInterval
        var lastReclaim = clock.now
        // after this dispatcher could not reach Redis, workers back from the same outage first get
        // `reclaimGraceAfterOutage` to ack what finished meanwhile (a late ack is taken only while the lease is not
        // yet claimed again) before their expired leases are taken back
        var reclaimNotBefore = clock.now
        var failing = false
        var lastLoss: Set<String> = []
        var backoff = Duration.milliseconds(100)
        var lastLeaderCheck = clock.now - configuration.leaderCheck
        var idleRotation = 0
        var lastPrune = clock.now
        var lastWideLook = clock.now - configuration.wideLookInterval
        while !isStopping {
            do {
                if clock.now - lastLeaderCheck >= configuration.leaderCheck {
                    try await checkLeadership()
                    lastLeaderCheck = clock.now
                }
                guard epoch != nil else {
                    try? await Task.sleep(for: configuration.leaderCheck)
                    continue
                }
                if clock.now - lastHealth >= configuration.healthInterval {
                    view = try await refreshView()
                    lastHealth = clock.now
                    observer.datacenters(Array(view.states.values).sorted { $0.name < $1.name })
                    observer.queues(try await inspector.queueStats())
                    let lost = Set(view.states.values.filter { $0.status == .lost && $0.lastHeartbeatMs > 0 }.map(\.name))
                    for dc in lost.subtracting(lastLoss) {
                        logger.warning("datacenter \(dc) is lost: \(view.states[dc]?.reason ?? "")")
                    }
                    for dc in lastLoss.subtracting(lost) { logger.info("datacenter \(dc) is back") }
                    lastLoss = lost
                    try await drainUnavailable(view)
                }
                if clock.now - lastWideLook >= configuration.wideLookInterval {
                    try await reportStranded(view)
                    try await reportRedisMemory()
                    try await reportCeleryReserved()
                    lastWideLook = clock.now
                }
                if failing {
                    failing = false
                    reclaimNotBefore = clock.now + configuration.reclaimGraceAfterOutage
                    logger.notice("Redis answers again; reclaiming expired leases from \(configuration.reclaimGraceAfterOutage) on, so workers can ack what finished meanwhile")
                }
                if clock.now - lastReclaim >= configuration.reclaimInterval && clock.now >= reclaimNotBefore {
                    try await reclaim()
                    lastReclaim = clock.now
                }
                if clock.now - lastPrune >= .seconds(60) {
                    // a worker's hash expires an hour after its last heartbeat; drop its heartbeat entry too
                    try await inspector.pruneWorkers(olderThanMs: 3_600_000)
                    lastPrune = clock.now
                }
                let (moved, waiting) = try await dispatchOnce(view)
                backoff = .milliseconds(100)
                if moved == 0 && waiting > 0 {
                    // work waits but no datacenter has room: wake when a worker claims (room appears), not
                    // when Airflow publishes
                    try await broker.waitForCapacity(timeout: configuration.capacityWait)
                } else if moved == 0 {
                    // nothing waits: block on the plain list of one queue (rotating) instead of polling
                    let queues = watchedQueues(view)
                    if queues.isEmpty || view.live.isEmpty {
                        try? await Task.sleep(for: configuration.idleWait)
                    } else {
                        idleRotation &+= 1
                        _ = try await broker.waitForIngress(
                            queue: queues[idleRotation % queues.count], timeout: configuration.idleWait)
                    }
                }
            } catch let e as RedisError where e.code == .server && e.message.contains("FENCED") {
                epochBox.withLock { $0 = nil }
                observer.leadership(epoch: nil)
                logger.warning("deposed: another dispatcher leads now (\(e.message)); standing by")
            } catch {
                failing = true
                observer.brokerError()
                logger.error("dispatcher cycle failed: \(error) — retrying in \(backoff)")
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
        if epoch != nil {
            // hand over at once rather than make the standby wait out the lease
            _ = try? await broker.lead(candidate: configuration.dispatcherID, leaseMs: 0, release: true)
        }
        logger.info("dispatcher stopped")
    }

    /// Takes or keeps the leader lease; logs every change.
    func checkLeadership() async throws {
        let l = try await broker.lead(candidate: configuration.dispatcherID, leaseMs: configuration.leaderLease.inMilliseconds)
        let before = epoch
        let now: Int64? = l.isLeader ? l.epoch : nil
        epochBox.withLock { $0 = now }
        if before != now {
            observer.leadership(epoch: now)
            if let now {
                logger.notice("leading with epoch \(now)")
            } else {
                logger.notice("standing by: \(l.owner) leads with epoch \(l.epoch)")
            }
        }
    }

    func refreshView() async throws -> View {
        let lossMs = configuration.dcLossAfter.inMilliseconds
        var known = Set<String>()
        for rule in configuration.policy.rules.values {
            switch rule {
            case .spread(let dcs): known.formUnion(dcs ?? [])
            case .pin(let dc, let fb):
                known.insert(dc)
                if let fb { known.insert(fb) }
            }
        }
        let states = try await inspector.datacenters(lossAfterMs: lossMs, known: known)
        let now = try await broker.now()
        let workers = try await inspector.workers().filter { now - $0.lastSeenMs <= lossMs }
        var v = View()
        for s in states { v.states[s.name] = s }
        v.workers = workers
        return v
    }

    /// The ingress queues to watch: the policy's, the configured ones, and every queue a live worker serves.
    func watchedQueues(_ view: View) -> [String] {
        var qs = Set(configuration.queues).union(configuration.policy.namedQueues)
        for w in view.workers { qs.formUnion(w.queues) }
        return qs.sorted()
    }

    /// Finds work in Airflow's lists that nothing can take now (a queue no live worker serves, or one the policy
    /// sends only where it cannot run), and says so: Celery would leave it there silently until Airflow's
    /// `task_queued_timeout` fails the task. The messages stay where they are (safe) until a worker that serves
    /// the queue appears.
    func reportStranded(_ view: View) async throws {
        var scan = declaredScan.withLock { $0 }
        let declared = try await inspector.declaredQueues(continuing: &scan, pages: configuration.declaredScanPages)
        declaredScan.withLock { $0 = scan }
        let queues = Set(declared).union(watchedQueues(view)).sorted()
        let waiting = try await inspector.ingressWaiting(queues: queues)
        let found = StrandedQueue.find(waiting: waiting, workers: view.workers, live: view.live, policy: configuration.policy)
        let now = ContinuousClock.now
        let (stranded, toLog, cleared) = strandedState.withLock { st -> ([StrandedQueue], [StrandedQueue], [String]) in
            let stranded = found.filter { st.seen.contains($0.queue) }
            st.seen = Set(found.map(\.queue))
            var toLog: [StrandedQueue] = []
            for s in stranded {
                if let last = st.logged[s.queue], last.reason == s.reason, now - last.at < configuration.strandedRepeat { continue }
                st.logged[s.queue] = (s.reason, now)
                toLog.append(s)
            }
            let cleared = st.logged.keys.filter { q in !stranded.contains { $0.queue == q } }.sorted()
            for q in cleared { st.logged[q] = nil }
            return (stranded, toLog, cleared)
        }
        observer.ingress(waiting: waiting, stranded: stranded)
        for s in toLog {
            logger.warning("\(s.waiting) message(s) wait in Airflow's list for queue '\(s.queue)' and nothing can take them: \(s.reason)",
                           metadata: ["queue": .string(s.queue), "waiting": .stringConvertible(s.waiting)])
        }
        for q in cleared { logger.info("queue '\(q)' is no longer stranded", metadata: ["queue": .string(q)]) }
    }

    /// Reads Redis's memory against its maxmemory for the metrics, and says so once when it crosses 90% (either
    /// way): at the limit Redis refuses Airflow's publishes, so new tasks cannot be queued.
    func reportRedisMemory() async throws {
        let memory = try await inspector.memory()
        observer.redisMemory(usedBytes: memory.usedBytes, maxBytes: memory.maxBytes)
        let high = (memory.fraction ?? 0) >= 0.9
        guard redisMemoryHigh.withLock({ was in defer { was = high }; return was != high }) else { return }
        if high {
            logger.warning("Redis is at \(memory.summary): at maxmemory it refuses Airflow's publishes and new tasks cannot be queued (work already in Tandem keeps running) — raise maxmemory, or find what fills it (executorctl queues, dlq list)")
        } else {
            logger.notice("Redis memory is below 90% of maxmemory again (\(memory.summary))")
        }
    }

    /// Messages stock Celery workers reserved and never acked wait in kombu's `unacked` hash, which Tandem does
    /// not read: after a move from Celery, what a killed Celery worker held would wait there unseen. Says so.
    func reportCeleryReserved() async throws {
        let (count, oldest) = try await inspector.celeryReservedCount()
        observer.celeryReserved(count: count)
        let now = ContinuousClock.now
        let log = celeryReservedLogged.withLock { last -> Bool? in
            if count == 0 { defer { last = nil }; return last == nil ? nil : false }
            if let l = last, now - l < configuration.strandedRepeat { return nil }
            last = now
            return true
        }
        if log == true {
            let age = oldest.map { " (oldest reserved \(Duration.milliseconds($0).inSeconds.rounded()) s ago)" } ?? ""
            logger.warning("\(count) message(s) are reserved by stock Celery workers and never acked (kombu's unacked hash)\(age): Tandem does not run them. If no Celery worker runs any more, `executorctl adopt --all` restores them for Tandem (`executorctl adopt --dry-run` shows them)")
        } else if log == false {
            logger.notice("no message is reserved by a stock Celery worker any more")
        }
    }

    /// One pass over the ingress lists. Returns how many messages moved, and how many could go to a live
    /// datacenter but found no room.
    func dispatchOnce(_ view: View) async throws -> (moved: Int, waiting: Int) {
        let queues = watchedQueues(view)
        let live = view.live
        let workers = view.workers.filter { $0.state == .running && live.contains($0.datacenter) }
        // one round trip: the length of every ingress list and of every live datacenter queue, and each live
        // worker's slot counts as of its last claim (fresher than its heartbeat's `busy`)
        var cmds: [[String]] = []
        for q in queues { for l in Keys.dispatchSources(queue: q) { cmds.append(["LLEN", l]) } }
        let dcs = live.sorted()
        for q in queues { for dc in dcs { cmds.append(["LLEN", Keys.queue(datacenter: dc, queue: q)]) } }
        for w in workers { cmds.append(["HMGET", Keys.worker(w.workerID), "claimed", "released"]) }
        let replies = try await broker.client.pipeline(cmds)
        var i = 0
        var waiting: [String: Int] = [:]
        for q in queues {
            for _ in Keys.dispatchSources(queue: q) {
                waiting[q, default: 0] += Int(replies[i].int ?? 0)
                i += 1
            }
        }
        var depth: [String: Int] = [:]
        for q in queues { for dc in dcs { depth["\(dc)\t\(q)"] = Int(replies[i].int ?? 0); i += 1 } }
        var busy: [String: Int] = [:]
        var claimedByDC: [String: Int] = [:]
        for w in workers {
            let f = replies[i].array ?? []
            i += 1
            if f.count == 2, let claimed = f[0].string.flatMap({ Int($0) }), let released = f[1].string.flatMap({ Int($0) }) {
                busy[w.workerID] = min(w.slots, max(0, claimed - released))
                claimedByDC[w.datacenter, default: 0] += claimed
            } else {
                busy[w.workerID] = w.busy  // a worker that does not count its slots: its heartbeat's figure
            }
        }
        let prefetchPerSlot = prefetchPerSlot(claimedByDC: claimedByDC, slotsByDC: workers.reduce(into: [:]) { $0[$1.datacenter, default: 0] += $1.slots })

        var moved = 0
        // work that could go somewhere now but did not fit (work for a datacenter that is down does not count)
        var blocked = 0
        // idle slots handed out in this pass, so two queues served by the same slots do not both count them
        var placedIdle: [String: Int] = [:]
        for q in queues where (waiting[q] ?? 0) > 0 || dcs.contains(where: { (depth["\($0)\t\(q)"] ?? 0) > 0 }) {
            let eligible = configuration.policy.eligibleDatacenters(for: q, live: live).filter { dc in
                workers.contains { $0.datacenter == dc && $0.queues.contains(q) }
            }
            var room: [String: RoutingPolicy.Room] = [:]
            for dc in eligible {
                let serving = workers.filter { $0.datacenter == dc && $0.queues.contains(q) }
                let slots = serving.map(\.slots).reduce(0, +)
                let taken = serving.map { busy[$0.workerID] ?? 0 }.reduce(0, +)
                let queued = depth["\(dc)\t\(q)"] ?? 0
                let prefetch = Int((prefetchPerSlot[dc] ?? 0) * Double(slots))
                let idle = max(0, slots - taken - queued - placedIdle[dc, default: 0])
                // top up the prefetch only once half of it has been claimed: under a backlog one pass then moves
                // several messages instead of one pass per claim
                let refillAt = prefetch / 2
                let prefetched = max(0, queued - max(0, slots - taken))  // queued beyond the idle slots
                let prefetchRoom = prefetched <= refillAt ? prefetch - prefetched : 0
                room[dc] = RoutingPolicy.Room(idleSlots: idle, prefetch: prefetchRoom)
                // claim.lua leaves a capacity token (waking this dispatcher when work waits) once a claim or a
                // freed slot finds the queue at or below this depth
                try await markRefill(Keys.queue(datacenter: dc, queue: q), atDepth: refillAt)
            }
            let shares = RoutingPolicy.place(
                available: min(waiting[q] ?? 0, configuration.batch), eligible: eligible, room: room)
            var movedHere = 0
            var idleLeft = room.mapValues(\.idleSlots)
            for (dc, n) in shares {
                let m = try await broker.dispatch(queue: q, to: dc, max: n, epoch: epoch ?? -1)
                if m > 0 { observer.dispatched(queue: q, datacenter: dc, count: m) }
                idleLeft[dc, default: 0] -= min(m, idleLeft[dc] ?? 0)
                movedHere += m
            }
            moved += movedHere
            if !eligible.isEmpty { blocked += max(0, (waiting[q] ?? 0) - movedHere) }
            if movedHere == (waiting[q] ?? 0) {
                for (dc, n) in try await shareQueued(q, eligible: eligible, room: room, idleLeft: idleLeft, depth: depth) {
                    idleLeft[dc, default: 0] -= n
                }
            }
            for (dc, r) in room { placedIdle[dc, default: 0] += r.idleSlots - (idleLeft[dc] ?? 0) }
        }
        if moved > 0 { counters.withLock { $0["dispatched", default: 0] += moved } }
        return (moved, blocked)
    }

    /// Jobs queued in a datacenter whose slots are all busy (prefetched while it was claiming fast, then its slots
    /// took long tasks) move to a datacenter with idle slots, oldest first, once nothing else waits for those
    /// slots in the ingress list: no job waits behind a busy slot while another datacenter's slot is idle.
    /// Returns how many went where.
    func shareQueued(
        _ q: String, eligible: [String], room: [String: RoutingPolicy.Room], idleLeft: [String: Int], depth: [String: Int]
    ) async throws -> [(String, Int)] {
        guard eligible.count > 1 else { return [] }
        var idle = idleLeft
        var shared: [(String, Int)] = []
        for from in eligible where (room[from]?.idleSlots ?? 0) == 0 {
            var stuck = depth["\(from)\t\(q)"] ?? 0
            for to in eligible where to != from && stuck > 0 && (idle[to] ?? 0) > 0 {
                let n = try await broker.rebalance(queue: q, from: from, to: to, max: min(stuck, idle[to] ?? 0), epoch: epoch ?? -1)
                guard n > 0 else { break }
                stuck -= n
                idle[to, default: 0] -= n
                shared.append((to, n))
                counters.withLock { $0["shared", default: 0] += n }
                observer.shared(queue: q, from: from, to: to, count: n)
                logger.debug("moved \(n) job(s) of \(q) queued behind busy slots in \(from) to idle slots in \(to)")
            }
        }
        return shared
    }

    /// Each datacenter's prefetch as a fraction of its slots: what its workers claim in `prefetchWindow`, at most
    /// `prefetchFactor` × slots. The claim rate is measured over at least 200 ms from the claim counts.
    func prefetchPerSlot(claimedByDC: [String: Int], slotsByDC: [String: Int]) -> [String: Double] {
        let now = ContinuousClock.now
        return claimRates.withLock { rates in
            var out: [String: Double] = [:]
            for (dc, claimed) in claimedByDC {
                var r = rates[dc] ?? ClaimRate(since: now, claimedThen: claimed)
                let elapsed = (now - r.since).inSeconds
                if claimed < r.claimedThen {
                    r = ClaimRate(since: now, claimedThen: claimed, perSecond: r.perSecond)  // a worker restarted
                } else if elapsed >= 0.2 {
                    r = ClaimRate(since: now, claimedThen: claimed, perSecond: Double(claimed - r.claimedThen) / elapsed)
                }
                rates[dc] = r
                let slots = max(1, slotsByDC[dc] ?? 1)
                let wanted = (r.perSecond * configuration.prefetchWindow.inSeconds).rounded(.down)
                out[dc] = min(Double(configuration.prefetchFactor), wanted / Double(slots))
            }
            return out
        }
    }

    /// Records the depth at or below which claims of `queueKey` wake this dispatcher (written only when it changes;
    /// a wrong mark only delays a refill by `capacityWait`).
    private func markRefill(_ queueKey: String, atDepth depth: Int) async throws {
        let mark = max(0, depth)
        guard refillMarks.withLock({ $0[queueKey] }) != mark else { return }
        _ = try await broker.client.send(["HSET", Keys.refillMarks, queueKey, String(mark)])
        refillMarks.withLock { $0[queueKey] = mark }
    }

    /// Reclaims expired leases (dead or frozen workers); the jobs go back to the front of their queue.
    func reclaim() async throws {
        while true {
            let r = try await broker.reclaimExpired(maxAttempts: configuration.maxAttempts, limit: 500)
            for j in r {
                if j.disposition == .dead {
                    logger.error("job \(j.jobID) dead-lettered: lease expired \(j.attempts) times (max attempts \(configuration.maxAttempts))")
                } else {
                    logger.warning("reclaimed job \(j.jobID) from an expired lease (attempt \(j.attempts)); back at the front of its queue")
                }
            }
            if !r.isEmpty {
                observer.reclaimed(
                    requeued: r.filter { $0.disposition == .requeued }.count, dead: r.filter { $0.disposition == .dead }.count)
            }
            counters.withLock {
                $0["reclaimed", default: 0] += r.filter { $0.disposition == .requeued }.count
                $0["dead", default: 0] += r.filter { $0.disposition == .dead }.count
            }
            if r.count < 500 { return }
        }
    }

    /// Moves queued work out of datacenters that take no new work (lost, or draining for maintenance) to a
    /// datacenter the policy allows, preferring the one with the most free slots.
    func drainUnavailable(_ view: View) async throws {
        let live = view.live
        guard !live.isEmpty else { return }
        for (dc, queue) in try await inspector.knownQueues() where !live.contains(dc) {
            let eligible = configuration.policy.eligibleDatacenters(for: queue, live: live).filter { target in
                view.workers.contains { $0.datacenter == target && $0.queues.contains(queue) }
            }
            guard
                let target = eligible.max(by: { a, b in
                    (view.states[a]?.slots ?? 0) - (view.states[a]?.busy ?? 0)
                        < (view.states[b]?.slots ?? 0) - (view.states[b]?.busy ?? 0)
                })
            else { continue }
            var total = 0
            while true {
                let n = try await broker.rebalance(queue: queue, from: dc, to: target, max: 1000, epoch: epoch ?? -1)
                total += n
                if n < 1000 { break }
            }
            if total > 0 {
                logger.warning("moved \(total) queued job(s) of queue \(queue) from \(dc) (\(view.states[dc]?.status.rawValue ?? "unavailable")) to \(target)")
                counters.withLock { $0["rebalanced", default: 0] += total }
                observer.rebalanced(queue: queue, from: dc, to: target, count: total)
            }
        }
    }
}
