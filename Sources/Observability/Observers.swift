import ClientSupport
import Dispatcher
import Foundation
import TandemCore
import Worker

/// Buckets for task run time (seconds): Airflow tasks run from under a second to hours.
public let runTimeBuckets: [Double] = [0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200]
/// Buckets for queue wait (seconds): dispatch → claim, normally milliseconds, minutes when a datacenter is full.
public let queueWaitBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]

/// Whether a process's Redis round trips are working, from the errors and successes its runtime reports.
///
/// Not ready while the newest event is an error less than `window` old. The runtimes report errors at least every
/// 5 s while Redis is unreachable (their backoff cap), so once `window` passes without one, Redis is back even on
/// an idle process that reports no successes.
public final class BrokerHealth: @unchecked Sendable {
    private let lock = NSLock()
    private var lastError: Double?
    private var lastSuccess: Double?
    private var streak = 0
    private let window: Double
    private let now: @Sendable () -> Double

    public init(window: Double = 12, now: @escaping @Sendable () -> Double = { Date().timeIntervalSince1970 }) {
        self.window = window
        self.now = now
    }

    public func error() {
        let t = now()
        lock.withLock {
            lastError = t
            streak += 1
        }
    }

    public func success() {
        let t = now()
        lock.withLock {
            lastSuccess = t
            streak = 0
        }
    }

    /// Nil when healthy; otherwise one line saying what is wrong.
    public func problem(_ what: String = "Redis") -> String? {
        let t = now()
        return lock.withLock {
            guard let e = lastError, streak > 0, t - e < window else { return nil }
            if let s = lastSuccess, s > e { return nil }
            return "\(what) unreachable: \(streak) failed round trip(s) in a row, the last \(String(format: "%.1f", t - e)) s ago"
        }
    }
}

/// Records a worker's metrics in a registry (see `examples/monitoring/`).
public final class PrometheusWorkerObserver: WorkerObserver, @unchecked Sendable {
    public let registry: MetricsRegistry
    /// Redis health as seen from claims and renewals (for `/readyz`).
    public let broker: BrokerHealth
    let tasks: Counter
    let runTime: Histogram
    let queueWait: Histogram
    let claimed: Counter
    let renewals: Counter
    let refusals: Counter
    let fences: Counter
    let deadLetters: Counter
    let redisErrors: Counter
    let postgresErrors: Counter
    let busy: Gauge
    let loopStall: Gauge
    let slots: Gauge
    let claimedAhead: Gauge
    let aheadGivenBack: Counter

    public init(registry: MetricsRegistry = MetricsRegistry(), datacenter: String, workerID: String, slots total: Int,
        broker: BrokerHealth = BrokerHealth())
    {
        self.registry = registry
        self.broker = broker
        let r = registry
        tasks = r.counter("tandem_tasks_total", help: "Tasks finished, by outcome (SUCCESS, FAILURE, REVOKED), datacenter and queue.", labels: ["outcome", "dc", "queue"])
        runTime = r.histogram("tandem_task_run_seconds", help: "Run time of task processes.", labels: ["dc", "queue"], buckets: runTimeBuckets)
        queueWait = r.histogram("tandem_task_queue_wait_seconds", help: "Dispatch to claim, on Redis's clock.", labels: ["dc", "queue"], buckets: queueWaitBuckets)
        claimed = r.counter("tandem_jobs_claimed_total", help: "Jobs claimed from the datacenter queues.", labels: ["dc"])
        renewals = r.counter("tandem_lease_renewals_total", help: "Leases extended.")
        refusals = r.counter("tandem_lease_refusals_total", help: "Lease renewals refused: the job was reclaimed, its task was killed here.")
        fences = r.counter("tandem_fenced_total", help: "Writes or acks refused for a stale fencing token.", labels: ["dc", "queue"])
        deadLetters = r.counter("tandem_dead_letters_total", help: "Messages dead-lettered (never run).", labels: ["dc", "queue"])
        redisErrors = r.counter("tandem_redis_errors_total", help: "Failed Redis operations.")
        postgresErrors = r.counter("tandem_postgres_errors_total", help: "Failed Postgres operations.")
        busy = r.gauge("tandem_worker_slots_busy", help: "Task slots in use.")
        loopStall = r.gauge(
            "tandem_worker_loop_stall_seconds",
            help: "How long the worker loop (which starts, reaps and records every task) has left a probe waiting; about 0 while it keeps up.")
        slots = r.gauge("tandem_worker_slots", help: "Task slots (concurrency).")
        claimedAhead = r.gauge(
            "tandem_worker_jobs_claimed_ahead",
            help: "Jobs claimed ahead of a free slot (--claim-ahead): leased to this worker, not started yet.")
        aheadGivenBack = r.counter(
            "tandem_worker_claimed_ahead_given_back_total",
            help: "Jobs claimed ahead that waited past the hold limit (2 s) for a slot and went back to the front of their queue for any worker.")
        let info = r.gauge("tandem_worker_info", help: "This worker's datacenter, id and Tandem version (always 1).", labels: ["dc", "worker", "version"])
        info.set([datacenter, workerID, TandemVersion.current], 1)
        slots.set(Double(total))
        busy.set(0)
        loopStall.set(0)
        claimedAhead.set(0)
        for c in [renewals, refusals, redisErrors, postgresErrors, aheadGivenBack] { c.touch() }
        claimed.touch([datacenter])
        r.gauge("tandem_process_start_time_seconds", help: "Start time of the process (Unix seconds).")
            .set(Date().timeIntervalSince1970.rounded())
        registerConnectionStats(r)
    }

    /// Reads busy slots, jobs claimed ahead and the phase from the runtime at every scrape (the hooks report busy only
    /// when a slot frees).
    public func collect(from runtime: WorkerRuntime) {
        let phaseGauge = registry.gauge("tandem_worker_phase", help: "1 for the worker's phase (running, draining, stopped).", labels: ["phase"])
        let spooled = registry.gauge(
            "tandem_worker_writes_spooled",
            help: "Result and ledger writes waiting in the worker's local spool because Postgres is unreachable from it; Airflow sees those results once they are flushed.")
        registry.onCollect { [busy, claimedAhead] in
            busy.set(Double(runtime.busy))
            claimedAhead.set(Double(runtime.claimedAhead))
            spooled.set(Double(runtime.spooledWrites))
            let p = runtime.phase
            phaseGauge.replace(Dictionary(uniqueKeysWithValues: [WorkerStatus.State.running, .draining, .stopped].map {
                ([$0.rawValue], $0 == p ? 1.0 : 0.0)
            }))
        }
    }

    public func claimed(count: Int, datacenter: String) {
        broker.success()
        claimed.inc([datacenter], by: Double(count))
    }

    public func taskFinished(queue: String, datacenter: String, outcome: String, runSeconds: Double, queueWaitSeconds: Double) {
        tasks.inc([outcome, datacenter, queue])
        runTime.observe([datacenter, queue], max(0, runSeconds))
        queueWait.observe([datacenter, queue], max(0, queueWaitSeconds))
    }

    public func leaseRenewals(renewed: Int, refused: Int) {
        broker.success()
        renewals.inc(by: Double(renewed))
        refusals.inc(by: Double(refused))
    }

    public func fenced(queue: String, datacenter: String) { fences.inc([datacenter, queue]) }
    public func deadLettered(queue: String, datacenter: String) { deadLetters.inc([datacenter, queue]) }

    public func brokerOK() { broker.success() }

    public func brokerError() {
        broker.error()
        redisErrors.inc()
    }

    public func storeError() { postgresErrors.inc() }

    public func loopStalled(seconds: Double) { loopStall.set(seconds) }
    public func claimedAheadGivenBack(count: Int) { aheadGivenBack.inc(by: Double(count)) }

    public func slotsBusy(_ busy: Int, of total: Int) {
        self.busy.set(Double(busy))
        slots.set(Double(total))
    }

    /// Why the worker is not ready (nil: ready): it must be running (not draining) and reaching Redis.
    public func readiness(_ runtime: WorkerRuntime) -> String? {
        let p = runtime.phase
        if p != .running { return "worker is \(p.rawValue): not claiming new work" }
        return broker.problem()
    }
}

/// Records the dispatcher's metrics.
public final class PrometheusDispatcherObserver: DispatcherObserver, @unchecked Sendable {
    public let registry: MetricsRegistry
    public let broker: BrokerHealth
    let dispatchedC: Counter
    let reclaimedC: Counter
    let rebalancedC: Counter
    let sharedC: Counter
    let depth: Gauge
    let inFlight: Gauge
    let oldest: Gauge
    let ingressWaiting: Gauge
    let stranded: Gauge
    let redisUsed: Gauge
    let redisMax: Gauge
    let celeryReservedG: Gauge
    let status: Gauge
    let dcWorkers: Gauge
    let dcSlots: Gauge
    let dcBusy: Gauge
    let losses: Counter
    let epoch: Gauge
    let leader: Gauge
    let redisErrors: Counter
    let loopStall: Gauge
    /// Not ready while the dispatcher loop has left a probe waiting this long (set to the dispatcher's
    /// `loopStallWarning`).
    public var loopStallLimit: Double = 5
    private let lock = NSLock()
    private var lastStatus: [String: DatacenterState.Status] = [:]
    private var sawHealth = false

    public init(registry: MetricsRegistry = MetricsRegistry(), broker: BrokerHealth = BrokerHealth()) {
        self.registry = registry
        self.broker = broker
        let r = registry
        dispatchedC = r.counter("tandem_dispatched_total", help: "Messages moved from Airflow's lists into datacenter queues.", labels: ["queue", "dc"])
        reclaimedC = r.counter("tandem_reclaimed_total", help: "Expired leases reclaimed: requeued, or dead-lettered after max attempts.", labels: ["disposition"])
        rebalancedC = r.counter("tandem_rebalanced_total", help: "Queued jobs moved from a lost or draining datacenter to another.", labels: ["queue", "from", "to"])
        sharedC = r.counter("tandem_shared_total", help: "Queued jobs moved from a datacenter whose slots were all busy to one with idle slots.", labels: ["queue", "from", "to"])
        depth = r.gauge("tandem_queue_depth", help: "Jobs queued in a datacenter queue.", labels: ["dc", "queue"])
        inFlight = r.gauge("tandem_queue_in_flight", help: "Leased (running) jobs of a datacenter queue.", labels: ["dc", "queue"])
        oldest = r.gauge("tandem_queue_oldest_age_seconds", help: "Age of the oldest queued job (0 when empty).", labels: ["dc", "queue"])
        ingressWaiting = r.gauge("tandem_ingress_waiting", help: "Messages waiting in Airflow's lists of a queue (before dispatch).", labels: ["queue"])
        stranded = r.gauge(
            "tandem_ingress_stranded",
            help: "Messages waiting in Airflow's lists of a queue that nothing can take now (no live worker serves the queue, or the policy sends it only where none does); the dispatcher's log says why.",
            labels: ["queue"])
        redisUsed = r.gauge("tandem_redis_memory_used_bytes", help: "Redis's used_memory (INFO memory), read by the leading dispatcher.")
        redisMax = r.gauge("tandem_redis_memory_max_bytes", help: "Redis's maxmemory (0: no limit); at it, Redis refuses Airflow's publishes.")
        celeryReservedG = r.gauge("tandem_celery_reserved", help: "Messages stock Celery workers reserved and never acked (kombu's unacked hash): Tandem does not run them until executorctl adopt restores them.")
        status = r.gauge("tandem_datacenter_status", help: "1 for the datacenter's current status (alive, draining, lost), 0 for the others.", labels: ["dc", "status"])
        dcWorkers = r.gauge("tandem_datacenter_workers", help: "Workers heartbeating in the datacenter.", labels: ["dc"])
        dcSlots = r.gauge("tandem_datacenter_slots", help: "Slots of the datacenter's running workers.", labels: ["dc"])
        dcBusy = r.gauge("tandem_datacenter_slots_busy", help: "Busy slots in the datacenter.", labels: ["dc"])
        losses = r.counter("tandem_datacenter_losses_total", help: "Times a datacenter went from alive or draining to lost (failovers).", labels: ["dc"])
        epoch = r.gauge("tandem_leader_epoch", help: "Leader epoch of this dispatcher (0 while standby).")
        leader = r.gauge("tandem_dispatcher_leader", help: "1 when this dispatcher leads, 0 when standby.")
        redisErrors = r.counter("tandem_redis_errors_total", help: "Failed dispatcher cycles (Redis operations).")
        loopStall = r.gauge(
            "tandem_dispatcher_loop_stall_seconds",
            help: "How long the dispatcher loop (which dispatches, reclaims and drains) has left a probe waiting; about 0 while it keeps up.")
        loopStall.set(0)
        // a standby is told only when it starts leading: it reports 0 until then
        epoch.set(0)
        leader.set(0)
        r.gauge("tandem_dispatcher_info", help: "This dispatcher's Tandem version (always 1).", labels: ["version"])
            .set([TandemVersion.current], 1)
        reclaimedC.touch(["requeued"])
        reclaimedC.touch(["dead"])
        redisErrors.touch()
        r.gauge("tandem_process_start_time_seconds", help: "Start time of the process (Unix seconds).")
            .set(Date().timeIntervalSince1970.rounded())
        registerConnectionStats(r)
    }

    public func dispatched(queue: String, datacenter: String, count: Int) {
        dispatchedC.inc([queue, datacenter], by: Double(count))
    }

    public func reclaimed(requeued: Int, dead: Int) {
        reclaimedC.inc(["requeued"], by: Double(requeued))
        reclaimedC.inc(["dead"], by: Double(dead))
    }

    public func rebalanced(queue: String, from: String, to: String, count: Int) {
        rebalancedC.inc([queue, from, to], by: Double(count))
    }

    public func shared(queue: String, from: String, to: String, count: Int) {
        sharedC.inc([queue, from, to], by: Double(count))
    }

    public func datacenters(_ states: [DatacenterState]) {
        broker.success()
        var s: [[String]: Double] = [:]
        for d in states {
            for st in [DatacenterState.Status.alive, .draining, .lost] { s[[d.name, st.rawValue]] = d.status == st ? 1 : 0 }
            dcWorkers.set([d.name], Double(d.liveWorkers))
            dcSlots.set([d.name], Double(d.slots))
            dcBusy.set([d.name], Double(d.busy))
            losses.touch([d.name])
        }
        status.replace(s)
        let newlyLost = lock.withLock { () -> [String] in
            var out: [String] = []
            for d in states {
                if d.status == .lost, let before = lastStatus[d.name], before != .lost { out.append(d.name) }
                lastStatus[d.name] = d.status
            }
            return out
        }
        for dc in newlyLost { losses.inc([dc]) }
    }

    public func queues(_ stats: [QueueStats]) {
        var d: [[String]: Double] = [:]
        var f: [[String]: Double] = [:]
        var o: [[String]: Double] = [:]
        for q in stats {
            d[[q.datacenter, q.queue]] = Double(q.depth)
            f[[q.datacenter, q.queue]] = Double(q.inFlight)
            o[[q.datacenter, q.queue]] = Double(q.oldestAgeMs) / 1000
        }
        depth.replace(d)
        inFlight.replace(f)
        oldest.replace(o)
    }

    public func ingress(waiting: [String: Int], stranded s: [StrandedQueue]) {
        ingressWaiting.replace(Dictionary(uniqueKeysWithValues: waiting.map { ([$0.key], Double($0.value)) }))
        var st: [[String]: Double] = Dictionary(uniqueKeysWithValues: waiting.keys.map { ([$0], 0) })
        for q in s { st[[q.queue]] = Double(q.waiting) }
        stranded.replace(st)
    }

    public func redisMemory(usedBytes: Int64, maxBytes: Int64) {
        redisUsed.set(Double(usedBytes))
        redisMax.set(Double(maxBytes))
    }

    public func celeryReserved(count: Int) { celeryReservedG.set(Double(count)) }

    public func leadership(epoch e: Int64?) {
        epoch.set(Double(e ?? 0))
        leader.set(e == nil ? 0 : 1)
        if e == nil {
            // a standby stops refreshing these: drop them so max() across dispatchers shows the leader's view
            for g in [depth, inFlight, oldest, ingressWaiting, stranded, redisUsed, redisMax, celeryReservedG, status, dcWorkers, dcSlots, dcBusy] { g.replace([:]) }
        }
    }

    public func brokerError() {
        broker.error()
        redisErrors.inc()
    }

    public func loopStalled(seconds: Double) { loopStall.set(seconds) }

    /// Why the dispatcher is not ready (nil: ready): its loop must keep running and Redis must answer.
    public func readiness() -> String? {
        let stalled = registry.value("tandem_dispatcher_loop_stall_seconds") ?? 0
        if stalled >= loopStallLimit {
            return "the dispatcher loop has not run for \(Int(stalled)) s: nothing is dispatched — see its log"
        }
        return broker.problem()
    }
}

/// Connections opened to Redis and Postgres since start; a rise after start-up means the process reconnected.
func registerConnectionStats(_ r: MetricsRegistry) {
    let redis = r.gauge("tandem_redis_connects", help: "Redis connections opened since start (more than the client count: reconnects).")
    let postgres = r.gauge("tandem_postgres_connects", help: "Postgres connections opened since start (more than the client count: reconnects).")
    r.onCollect {
        redis.set(Double(ConnectionStats.redisConnects.current))
        postgres.set(Double(ConnectionStats.postgresConnects.current))
    }
}
