import ClientSupport
import Foundation
import Synchronization
import Logging
import Redis
import TandemCore

/// The production `Broker`: Tandem's queues, leases and dead letters on Redis, each move one Lua script.
public final class RedisBroker: Broker {
    public let client: RedisClient
    /// Idle workers block here (BLPOP on the wake list) rather than on `client`, so a long wait never delays a
    /// renewal or an ack queued behind it on the same connection.
    private let waiter: RedisClient

    /// Connections the moves (claims, renewals, acks, dispatches) take turns on. One connection answers one
    /// request at a time, so far from Redis every concurrent task would wait behind the others' round trips.
    static let moverConnections = 4
    private let movers: [RedisClient]
    private let nextMover = Mutex(0)
    /// Given the worker's loop: claims and acks, which that loop makes, are written and answered on it (one
    /// connection, calls pipelined, no thread woken per call). Renewals and the rest stay on the movers, so they
    /// go on while the loop is held up.
    private let onLoop: RedisClient?
    /// Acks waiting for the call in flight to return (see `ack`).
    private let acks = Combiner<(String, Int64), FencedOutcome>(lanes: 1, maxBatch: 256)

    /// With Sentinel: after every move, wait until this many replicas have it (Redis WAIT), so a failover right
    /// after a claim or an ack cannot roll it back. 0 = asynchronous replication (Redis's default).
    public let replicaAcks: Int
    public let replicaTimeoutMs: Int
    let logger: Logger

    /// - `loop`: the worker's loop. Claims, acks and the wait for work are written and answered on it; renewals,
    ///   heartbeats and the rest keep connections with threads of their own, so they go on while the loop is held
    ///   up (a worker's slots run on the loop).
    /// - `allCallsOnLoop`: the dispatcher's. Every call goes over one connection `loop` drives (and the wait over
    ///   a second): its cycle runs on that loop and makes one call at a time, so each reply resumes it right there
    ///   instead of waking a connection thread and then a pool thread.
    public init(
        configuration: RedisConfiguration, logger: Logger, replicaAcks: Int = 0, replicaTimeoutMs: Int = 500,
        loop: (any IOLoop)? = nil, allCallsOnLoop: Bool = false
    ) {
        precondition(!allCallsOnLoop || loop != nil, "allCallsOnLoop needs a loop")
        client = RedisClient(configuration: configuration, label: "broker", logger: logger, loop: allCallsOnLoop ? loop : nil)
        // (with replica acks, WAIT would hold up every call pipelined behind it: those keep a connection each —
        // except where calls are made one at a time anyway)
        onLoop = allCallsOnLoop ? nil : loop.flatMap {
            replicaAcks > 0 ? nil : RedisClient(configuration: configuration, label: "broker-loop", logger: logger, loop: $0)
        }
        // an idle worker's wait for work ends on its loop too: the claim that follows goes out from there at once,
        // instead of a connection thread waking the loop first
        waiter = RedisClient(configuration: configuration, label: "broker-wait", logger: logger, loop: loop)
        movers = allCallsOnLoop ? [client] : [client] + (1..<Self.moverConnections).map {
            RedisClient(configuration: configuration, label: "broker-\($0)", logger: logger)
        }
        self.replicaAcks = replicaAcks
        self.replicaTimeoutMs = replicaTimeoutMs
        self.logger = logger
    }

    /// Runs a script that moves work, then (with `replicaAcks`) waits for replicas to hold the move.
    private func move(_ script: RedisScript, keys: [String], args: [String], on chosen: RedisClient? = nil) async throws -> RedisValue {
        let client = chosen ?? movers[nextMover.withLock { n -> Int in
            n = (n + 1) % movers.count
            return n
        }]
        let reply = try await client.eval(script, keys: keys, args: args)
        if replicaAcks > 0 {
            // WAIT counts this connection's writes: it must follow the move on the same connection
            let acked = try await client.send(["WAIT", String(replicaAcks), String(replicaTimeoutMs)]).int ?? 0
            if acked < replicaAcks {
                logger.warning("only \(acked) of \(replicaAcks) replica(s) confirmed a \(script.name) within \(replicaTimeoutMs) ms; a failover now could roll it back")
            }
        }
        return reply
    }

    /// Connects now (the first connection must work; the others are opened too, so no move pays a connect later).
    public func connect() async throws {
        try await client.connect()
        try await requireScriptFlags()
        try await requireKnownLayout()
        for m in movers.dropFirst() { try? await m.connect() }
        try await onLoop?.connect()
        try? await waiter.connect()
    }

    /// Tandem's scripts declare Redis 7 script flags (`allow-oom`); Redis 6 would refuse every one of them as a
    /// syntax error, so say so at start instead. (A server that refuses INFO, by ACL, is not checked.)
    private func requireScriptFlags() async throws {
        guard let info = try? await client.send(["INFO", "server"]).string, let problem = Self.versionProblem(info: info)
        else { return }
        throw RedisError(code: .server, message: problem)
    }

    /// Records this build's key layout on a Redis that has none, and refuses one a newer Tandem has moved on from:
    /// during a rolling upgrade an old worker must stop, not misread keys it no longer understands. (A Redis at its
    /// maxmemory refuses the SET; only the check matters then.)
    private func requireKnownLayout() async throws {
        _ = try? await client.send(["SET", Keys.layout, String(Keys.layoutVersion), "NX"])
        guard let stored = try await client.send(["GET", Keys.layout]).string, let problem = Self.layoutProblem(stored: stored)
        else { return }
        throw RedisError(code: .server, message: problem)
    }

    /// What is wrong with the key layout a Redis holds (`{tandem}:layout`), for this build; nil when it knows it.
    public static func layoutProblem(stored: String) -> String? {
        guard let v = Int(stored) else {
            return "\(Keys.layout) holds '\(stored)', not a layout version: something other than Tandem wrote it — check what else uses this Redis database"
        }
        guard v > Keys.layoutVersion else { return nil }
        return "this Redis holds Tandem key layout \(v), written by a newer Tandem; this build (\(TandemVersion.current)) knows layout \(Keys.layoutVersion) and could misread it — upgrade this host's Tandem (executorctl workers shows the version each worker runs)"
    }

    /// What is wrong with the server `INFO server` describes, for Tandem's scripts; nil when it is Redis 7 or later
    /// (or says no version).
    public static func versionProblem(info: String) -> String? {
        guard let line = info.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("redis_version:") }) else {
            return nil
        }
        let version = line.dropFirst("redis_version:".count).trimmingCharacters(in: .whitespaces)
        guard let major = Int(version.split(separator: ".").first ?? ""), major < 7 else { return nil }
        return "this Redis (\(version)) is too old: Tandem needs Redis 7.0 or later (its scripts declare Redis 7 script flags) — upgrade redis-server"
    }

    public func close() {
        for m in movers { m.close() }
        onLoop?.close()
        waiter.close()
    }

    public func dispatch(queue: String, to datacenter: String, max: Int, epoch: Int64?) async throws -> Int {
        let keys = [Keys.queue(datacenter: datacenter, queue: queue)] + Keys.dispatchSources(queue: queue)
        let reply = try await move(
            BrokerScripts.dispatch, keys: keys, args: [datacenter, queue, String(max), epoch.map(String.init) ?? ""])
        return Int(reply.int ?? 0)
    }

    public func claim(
        workerID: String, datacenter: String, queues: [String], max: Int, leaseMs: Int64, slots: SlotReport
    ) async throws -> [ClaimedJob] {
        let keys = [Keys.leases] + queues.map { Keys.queue(datacenter: datacenter, queue: $0) }
            + [Keys.revoked, Keys.refillMarks, Keys.worker(workerID)]
        let reply = try await move(
            BrokerScripts.claim, keys: keys,
            args: [workerID, String(leaseMs), String(max), String(slots.released), slots.incarnation, slots.claimID ?? ""],
            on: onLoop)
        let f = reply.array ?? []
        var jobs: [ClaimedJob] = []
        var i = 0
        while i + 8 < f.count {
            jobs.append(
                ClaimedJob(
                    jobID: f[i].string ?? "", token: f[i + 1].int ?? 0, attempts: Int(f[i + 2].int ?? 0),
                    raw: f[i + 3].bytes ?? [], ingressList: f[i + 4].string ?? "", queue: f[i + 5].string ?? "",
                    datacenter: f[i + 6].string ?? "", dispatchedAtMs: f[i + 7].int ?? 0,
                    leaseDeadlineMs: f[i + 8].int ?? 0))
            i += 9
        }
        // the last field counts the revokes in force: with none, no claimed task can be revoked yet
        if f.count == i + 1, f[i].int == 0 {
            for k in jobs.indices { jobs[k].mayBeRevoked = false }
        }
        return jobs
    }

    public func renew(workerID: String, jobs: [(jobID: String, token: Int64)], leaseMs: Int64) async throws -> [Bool] {
        if jobs.isEmpty { return [] }
        var args = [workerID, String(leaseMs)]
        for j in jobs { args += [j.jobID, String(j.token)] }
        let reply = try await move(BrokerScripts.renew, keys: [Keys.leases], args: args)
        return (reply.array ?? []).map { $0.int == 1 }
    }

    /// Acks ride together: while one ack call is on the wire, the acks that arrive meanwhile wait and go as the
    /// next call (the results of a group commit resolve together, so their acks do too). No ack waits for a timer.
    public func ack(jobID: String, token: Int64) async throws -> FencedOutcome {
        try await acks.submit((jobID, token)) { _, batch in
            do {
                let reply = try await move(
                    BrokerScripts.ack, keys: [Keys.leases], args: batch.flatMap { [$0.0, String($0.1)] }, on: onLoop)
                let done = reply.array ?? []
                return batch.indices.map { i in
                    switch i < done.count ? done[i].int : nil {
                    case 1: .success(.done)
                    case 2: .success(.doneLate)
                    default: .success(.fenced)
                    }
                }
            } catch {
                return batch.map { _ in .failure(error) }
            }
        }
    }

    public func jobExists(jobID: String) async throws -> Bool {
        try await client.send(["EXISTS", Keys.job(jobID)]).int == 1
    }

    public func requeue(jobID: String, token: Int64, refundAttempt: Bool) async throws -> FencedOutcome {
        let reply = try await move(
            BrokerScripts.requeue, keys: [Keys.leases], args: [jobID, String(token), refundAttempt ? "1" : "0"])
        return reply.int == 1 ? .done : .fenced
    }

    public func deadLetter(jobID: String, token: Int64, reason: String) async throws -> FencedOutcome {
        let reply = try await move(
            BrokerScripts.deadLetter, keys: [Keys.leases, Keys.deadLetters], args: [jobID, String(token), reason])
        return reply.int == 1 ? .done : .fenced
    }

    public func reclaimExpired(maxAttempts: Int, limit: Int) async throws -> [ReclaimedJob] {
        let reply = try await move(
            BrokerScripts.reclaim, keys: [Keys.leases, Keys.deadLetters], args: [String(maxAttempts), String(limit)])
        let f = reply.array ?? []
        var out: [ReclaimedJob] = []
        var i = 0
        while i + 2 < f.count {
            out.append(
                ReclaimedJob(
                    jobID: f[i].string ?? "",
                    disposition: ReclaimedJob.Disposition(rawValue: f[i + 1].string ?? "") ?? .requeued,
                    attempts: Int(f[i + 2].int ?? 0)))
            i += 3
        }
        return out
    }

    public func rebalance(queue: String, from: String, to: String, max: Int, epoch: Int64?) async throws -> Int {
        let reply = try await move(
            BrokerScripts.rebalance,
            keys: [Keys.queue(datacenter: from, queue: queue), Keys.queue(datacenter: to, queue: queue)],
            args: [to, String(max), epoch.map(String.init) ?? ""])
        return Int(reply.int ?? 0)
    }

    public func heartbeat(_ s: WorkerStatus, ttlSeconds: Int) async throws -> Int64 {
        let reply = try await client.eval(
            BrokerScripts.heartbeat, keys: [Keys.workers, Keys.worker(s.workerID)],
            args: [
                s.workerID, s.datacenter, String(s.slots), String(s.busy), s.queues.joined(separator: ","),
                s.hostname, String(s.pid), s.runningJobs.joined(separator: ","), s.state.rawValue, String(ttlSeconds),
                s.aheadJobs.joined(separator: ","), String(s.spooledWrites), s.version,
            ])
        return reply.int ?? 0
    }

    /// Whether an operator asked this worker to drain (`executorctl worker drain`); read after each heartbeat.
    public func drainRequested(workerID: String) async throws -> Bool {
        try await client.send(["HEXISTS", Keys.workerDrains, workerID]).int == 1
    }

    /// An idle dispatcher blocks here until Airflow publishes to `queue`'s plain list: BLMOVE parks the message in
    /// the staging list (a durable place; dispatch.lua drains it first), so waking costs no poll and loses nothing.
    /// Returns true when a message arrived.
    public func waitForIngress(queue: String, timeout: Duration) async throws -> Bool {
        let r = try await waiter.send([
            "BLMOVE", queue, Keys.staging(queue: queue), "RIGHT", "LEFT", Self.blockingTimeout(timeout),
        ])
        return !r.isNull
    }

    /// A blocking command's timeout argument: seconds with millisecond precision, never 0 (which means forever).
    private static func blockingTimeout(_ d: Duration) -> String { String(format: "%.3f", max(0.01, d.inSeconds)) }

    /// A dispatcher with work waiting and no room blocks here until a worker claims (claim.lua pushes a token).
    public func waitForCapacity(timeout: Duration) async throws {
        _ = try await waiter.send(["BLPOP", Keys.capacity, Self.blockingTimeout(timeout)])
    }

    public func waitForWork(datacenter: String, timeout: Duration) async throws {
        _ = try await waiter.send(["BLPOP", Keys.wake(datacenter: datacenter), Self.blockingTimeout(timeout)])
    }

    /// Dispatcher leadership: what the leader lease says after trying to take or keep it.
    public struct Leadership: Sendable, Hashable {
        public var epoch: Int64
        public var owner: String
        public var deadlineMs: Int64
        public var isLeader: Bool
    }

    /// Takes or renews the leader lease for `candidate` (or releases it when `release`).
    public func lead(candidate: String, leaseMs: Int64, release: Bool = false) async throws -> Leadership {
        let r = try await client.eval(
            BrokerScripts.leader, keys: [Keys.leader], args: [candidate, String(leaseMs), release ? "1" : "0"])
        let a = r.array ?? []
        return Leadership(
            epoch: a.first?.int ?? 0, owner: a.count > 1 ? a[1].string ?? "" : "",
            deadlineMs: a.count > 2 ? a[2].int ?? 0 : 0, isLeader: a.count > 3 && a[3].int == 1)
    }

    public func now() async throws -> Int64 {
        try await client.time().milliseconds
    }
}
