import Foundation
import TandemCore

/// Everything a worker needs to know; `swift-worker` fills it from flags, then the environment, then defaults.
public struct WorkerConfiguration: Sendable {
    public var datacenter: String
    public var queues: [String]
    public var concurrency: Int
    public var workerID: String
    public var hostname: String
    /// Lease length; a lease not renewed for this long may be reclaimed by another datacenter's dispatcher.
    public var leaseTTL: Duration = .seconds(30)
    public var renewInterval: Duration = .seconds(10)
    /// How long a finished task's ack keeps retrying through a broker outage (its result is already written): it
    /// is still taken after the lease expired as long as no other claim has the job, and then the task does not
    /// run a second time.
    public static let ackRetryLimit: Duration = .seconds(600)
    public var heartbeatInterval: Duration = DatacenterHealth.heartbeatInterval
    /// After SIGTERM, how long running tasks may finish before they are stopped (and recorded as failed); nil waits for them
    /// however long they take (a second SIGTERM still stops them now).
    public var shutdownGrace: Duration? = .seconds(60)
    /// After SIGTERM to a task's process group, how long before SIGKILL.
    public var killTimeout: Duration = defaultKillTimeout
    /// SIGTERM → SIGKILL for a task the worker's stop ends: the time Airflow's on_kill gets (`--kill-timeout`).
    public static let defaultKillTimeout: Duration = .seconds(10)
    /// Claim at most this many jobs per round trip (bounded by free slots).
    public var claimBatch: Int = 16
    /// How long a task runs before its start is written on its own (STARTED, the ledger's start). A task that ends
    /// sooner has start and end written in one transaction. Airflow does not act on STARTED.
    public var startRecordDelay: Duration = .milliseconds(100)
    /// Jobs whose process has ended and whose result and ack are still being written; past this many the worker
    /// stops claiming until some are written (back-pressure from a slow Postgres: leases held by finished work
    /// stay bounded). Not tied to `concurrency`: with few slots a limit of `concurrency` stopped claims whenever
    /// one commit took longer than one task.
    public var maxFinishing: Int
    /// Jobs claimed ahead while every slot is busy, held (lease renewed, not started) until a slot frees, so the
    /// next task starts without waiting for a claim's round trip; only while tasks are short (`claimAheadMaxRun`).
    /// 0: claim only for free slots, leaving queued work for any worker of the datacenter (SPEC §8). Given back at
    /// shutdown and after `claimAheadHoldLimit`.
    public var claimAhead: Int = Self.defaultClaimAhead
    /// Two, not one: at concurrency 2 both slots often free within one claim's round trip, and with one held job
    /// the second waited for the claim (3 alternated diag pairs at c=2: 888 / 957 / 817 → 912 / 1,009 / 977
    /// tasks/s, context switches per task 2.0 → 1.77).
    public static let defaultClaimAhead = 2
    /// Claim ahead only while this worker's recent tasks ran shorter than this (a held job waits for a slot).
    public var claimAheadMaxRun: Duration = .milliseconds(50)
    /// A job held ahead longer than this (its slot's task turned out long) is given back to its queue.
    public var claimAheadHoldLimit: Duration = Self.defaultClaimAheadHold
    public static let defaultClaimAheadHold: Duration = .seconds(2)
    /// Attempts a job gets when its task could not be started for a reason outside it (the runner died before
    /// starting it): put back before this attempt, FAILURE at it — a workload that kills the runner must end.
    public var launchAttempts: Int = 3
    /// A worker loop held up this long is reported (log error, `tandem_worker_loop_stall_seconds`).
    public var loopStallWarning: Duration = .seconds(5)
    /// Idle wait for work before polling again.
    public var idleWait: Duration = .milliseconds(500)

    /// At least 64, and four per slot. Enough for the results and acks of ~20 ms of tasks far from the servers: at 2.5 ms RTT a task's finishing
    /// takes two or three round trips (its batch's commit, the ack), and with 16 at c=16 the worker stopped claiming
    /// on back-pressure alone (857 tasks/s; 1,043–1,137 with 64; Benchmarks/diag_switches.py --far-ms 1).
    public static func defaultMaxFinishing(concurrency: Int) -> Int { max(64, 4 * concurrency) }

    public init(datacenter: String, queues: [String], concurrency: Int, workerID: String? = nil, hostname: String? = nil) {
        self.datacenter = datacenter
        self.queues = queues
        self.concurrency = concurrency
        self.maxFinishing = Self.defaultMaxFinishing(concurrency: concurrency)
        let host = hostname ?? ProcessInfo.processInfo.hostName
        self.hostname = host
        self.workerID = workerID ?? "\(datacenter)@\(host):\(getpid())"
    }
}
