import Foundation
import Redis
import TandemCore

/// The dispatcher leader lease (leader.lua's hash) as read at `nowMs` on Redis's clock.
public struct LeaderLease: Sendable, Equatable {
    public var owner: String
    public var epoch: Int64
    /// When this owner took the lead.
    public var sinceMs: Int64
    /// Until when the lease holds unless renewed; 0 once its owner stepped down.
    public var deadlineMs: Int64
    public var nowMs: Int64
    /// Someone leads now: the lease has not run out (a leader renews it every fifth of its length).
    public var isLive: Bool { deadlineMs >= nowMs }
}

/// What `BrokerInspector.handBack` gave back to Airflow's lists, per Airflow queue, and what it left.
public struct HandBack: Sendable, Equatable {
    public struct Counts: Sendable, Equatable {
        /// Queued in a datacenter queue, not claimed.
        public var queued = 0
        /// Parked by a dispatcher between Airflow's list and a datacenter queue.
        public var staged = 0
        /// Claimed by a worker that is gone (its lease ran out).
        public var expiredLeases = 0
        public var total: Int { queued + staged + expiredLeases }

        public init(queued: Int = 0, staged: Int = 0, expiredLeases: Int = 0) {
            self.queued = queued
            self.staged = staged
            self.expiredLeases = expiredLeases
        }
    }
    /// A job still held under a live lease: its worker is running it (or holds it ahead).
    public struct Held: Sendable, Equatable {
        public var jobID: String
        public var owner: String
        public var datacenter: String
        public var queue: String
        /// Time left on the lease when looked at.
        public var remainingMs: Int64
    }
    public var moved: [String: Counts] = [:]
    public var stillLeased: [Held] = []
    /// Queue entries whose job was already gone (nothing to give back).
    public var dropped = 0
    public var total: Int { moved.values.map(\.total).reduce(0, +) }
}

/// Where a `BrokerInspector.declaredQueues(continuing:pages:)` pass over the keyspace stands.
public struct DeclaredQueueScan: Sendable {
    var cursor = "0"
    /// Binding keys the pass under way has found, and those the last complete pass found.
    var found: Set<String> = []
    var lastPass: Set<String> = []
    /// Complete passes so far.
    public internal(set) var passes = 0
    /// Pages (1,000 keys each) a periodic caller goes per call — the dispatcher's look, `executorctl watch`'s
    /// frame: at most this many round trips however large the keyspace; a million keys take ~60 calls a pass.
    public static let pagesPerLook = 16
    public init() {}
}

/// Redis's memory against its `maxmemory`: at the limit (with `noeviction`) Redis refuses Airflow's publishes, so
/// new tasks cannot be queued (Tandem's own scripts keep running work going, SPEC decision 20).
public struct RedisMemory: Sendable, Equatable {
    public var usedBytes: Int64
    /// 0: no limit.
    public var maxBytes: Int64
    public var policy: String
    /// used / max, nil without a limit.
    public var fraction: Double? { maxBytes > 0 ? Double(usedBytes) / Double(maxBytes) : nil }

    /// "812.0 MiB of 1.0 GiB maxmemory (79%, noeviction)", or "812.0 MiB (no maxmemory)".
    public var summary: String {
        func size(_ b: Int64) -> String {
            let mib = Double(b) / 1_048_576
            return mib >= 1024 ? String(format: "%.1f GiB", mib / 1024) : String(format: "%.1f MiB", mib)
        }
        guard let f = fraction else { return "\(size(usedBytes)) (no maxmemory)" }
        return "\(size(usedBytes)) of \(size(maxBytes)) maxmemory (\(Int((f * 100).rounded()))%, \(policy))"
    }
}

/// Where a task's message is in Redis (`BrokerInspector.locate`).
public enum TaskLocation: Sendable, Equatable {
    case waitingInAirflowList(queue: String, list: String, position: Int)
    case queuedInDatacenter(datacenter: String, queue: String, jobID: String, position: Int)
    case leased(jobID: String, owner: String, datacenter: String, remainingMs: Int64)
    case deadLettered(jobID: String, reason: String)
    /// Taken by a stock Celery worker and never acked (kombu's `unacked` hash), this long ago.
    case reservedByCelery(ageMs: Int64?)
}

/// Read-mostly views of the broker for the dispatcher's routing decisions and for `executorctl`.
public struct BrokerInspector: Sendable {
    public let client: RedisClient

    public init(client: RedisClient) { self.client = client }

    /// Every worker that heartbeated within `withinMs` of now (all known workers when nil).
    public func workers(withinMs: Int64? = nil) async throws -> [WorkerStatus] {
        let now = try await client.time().milliseconds
        let min = withinMs.map { String(now - $0) } ?? "-inf"
        let ids = try await client.send(["ZRANGEBYSCORE", Keys.workers, min, "+inf", "WITHSCORES"]).array ?? []
        var out: [WorkerStatus] = []
        let pairs = withScores(ids)
        if pairs.isEmpty { return [] }
        let replies = try await client.pipeline(pairs.map { ["HGETALL", Keys.worker($0.0)] })
        for ((id, seen), reply) in zip(pairs, replies) {
            let h = hash(reply)
            guard let dc = h["dc"] else { continue }  // hash expired: the worker is long gone
            var status = WorkerStatus(
                workerID: id, datacenter: dc, slots: Int(h["slots"] ?? "") ?? 0, busy: Int(h["busy"] ?? "") ?? 0,
                queues: (h["queues"] ?? "").split(separator: ",").map(String.init),
                hostname: h["hostname"] ?? "", pid: Int32(h["pid"] ?? "") ?? 0,
                runningJobs: (h["running"] ?? "").split(separator: ",").map(String.init),
                aheadJobs: (h["ahead"] ?? "").split(separator: ",").map(String.init),
                state: WorkerStatus.State(rawValue: h["state"] ?? "") ?? .running, lastSeenMs: seen)
            status.spooledWrites = Int(h["spooled"] ?? "") ?? 0
            status.version = h["version"] ?? ""
            out.append(status)
        }
        return out
    }

    /// The dispatcher leader lease as Redis holds it (nil: no dispatcher has ever led here), read with Redis's clock.
    public func leaderLease() async throws -> LeaderLease? {
        let now = try await client.time().milliseconds
        let h = hash(try await client.send(["HGETALL", Keys.leader]))
        guard let owner = h["owner"], !owner.isEmpty else { return nil }
        return LeaderLease(
            owner: owner, epoch: Int64(h["epoch"] ?? "") ?? 0, sinceMs: Int64(h["since_ms"] ?? "") ?? 0,
            deadlineMs: Int64(h["deadline_ms"] ?? "") ?? 0, nowMs: now)
    }

    /// Removes workers not seen for `olderThanMs` from the heartbeat set (their hashes expire on their own).
    public func pruneWorkers(olderThanMs: Int64) async throws {
        let now = try await client.time().milliseconds
        _ = try await client.send(["ZREMRANGEBYSCORE", Keys.workers, "-inf", "(\(now - olderThanMs)"])
    }

    /// The (datacenter, queue) pairs that have ever held work.
    public func knownQueues() async throws -> [(datacenter: String, queue: String)] {
        let members = try await client.send(["SMEMBERS", Keys.queues]).array ?? []
        return members.compactMap { m in
            guard let s = m.string, let tab = s.firstIndex(of: "\t") else { return nil }
            return (String(s[..<tab]), String(s[s.index(after: tab)...]))
        }.sorted { ($0.datacenter, $0.queue) < ($1.datacenter, $1.queue) }
    }

    /// Depth, in-flight count and oldest age of each datacenter queue.
    public func queueStats() async throws -> [QueueStats] {
        let queues = try await knownQueues()
        let now = try await client.time().milliseconds
        var cmds: [[String]] = []
        for q in queues {
            let key = Keys.queue(datacenter: q.datacenter, queue: q.queue)
            cmds.append(["LLEN", key])
            cmds.append(["LINDEX", key, "-1"])
        }
        let replies = cmds.isEmpty ? [] : try await client.pipeline(cmds)
        // in flight: leased jobs, grouped by (dc, queue)
        let leased = try await client.send(["ZRANGE", Keys.leases, "0", "-1"]).array ?? []
        var inflight: [String: Int] = [:]
        if !leased.isEmpty {
            let f = try await client.pipeline(leased.map { ["HMGET", Keys.job($0.string ?? ""), "dc", "queue"] })
            for r in f {
                let a = r.array ?? []
                if a.count == 2, let dc = a[0].string, let q = a[1].string { inflight["\(dc)\t\(q)", default: 0] += 1 }
            }
        }
        var oldestIDs: [String] = []
        for i in queues.indices { oldestIDs.append(replies[2 * i + 1].string ?? "") }
        let ages = try await client.pipeline(oldestIDs.map { ["HGET", Keys.job($0.isEmpty ? "-" : $0), "dispatched_ms"] })
        return queues.enumerated().map { i, q in
            let depth = Int(replies[2 * i].int ?? 0)
            let dispatched = ages[i].int ?? 0
            return QueueStats(
                datacenter: q.datacenter, queue: q.queue, depth: depth,
                inFlight: inflight["\(q.datacenter)\t\(q.queue)"] ?? 0,
                oldestAgeMs: depth > 0 && dispatched > 0 ? max(0, now - dispatched) : 0)
        }
    }

    /// Operator overrides (`dc drain` / `dc fail`).
    public func overrides() async throws -> [String: DatacenterOverride] {
        let h = hash(try await client.send(["HGETALL", Keys.overrides]))
        return h.compactMapValues { DatacenterOverride(rawValue: $0) }
    }

    public func setOverride(_ dc: String, _ o: DatacenterOverride?) async throws {
        if let o {
            _ = try await client.send(["HSET", Keys.overrides, dc, o.rawValue])
        } else {
            _ = try await client.send(["HDEL", Keys.overrides, dc])
        }
    }

    /// Asks a worker to drain (claim nothing new; its running tasks finish; it stays up), or (false) to take work
    /// again. The worker sees it at its next heartbeat.
    public func setWorkerDrain(_ workerID: String, _ drain: Bool) async throws {
        if drain {
            _ = try await client.send(["HSET", Keys.workerDrains, workerID, String(try await client.time().milliseconds)])
        } else {
            _ = try await client.send(["HDEL", Keys.workerDrains, workerID])
        }
    }

    /// Workers an operator asked to drain.
    public func drainedWorkers() async throws -> Set<String> {
        Set((try await client.send(["HKEYS", Keys.workerDrains]).array ?? []).compactMap(\.string))
    }

    /// Datacenter states from heartbeats and overrides.
    public func datacenters(lossAfterMs: Int64, known: Set<String> = []) async throws -> [DatacenterState] {
        let now = try await client.time().milliseconds
        let workers = try await workers()
        let overrides = try await overrides()
        var names = known
        for q in try await knownQueues() { names.insert(q.datacenter) }
        return DatacenterHealth.evaluate(
            known: names, workers: workers, overrides: overrides, nowMs: now, lossAfterMs: lossAfterMs)
    }

    /// Every list where each queue's messages wait before dispatch, with its length, in one pipeline: per queue
    /// the dispatcher's staging list, then kombu's ingress lists (plain list first, then the priority siblings).
    public func ingressLists(queues: [String]) async throws -> [(queue: String, list: String, depth: Int)] {
        let lists = queues.flatMap { q in Keys.dispatchSources(queue: q).map { (queue: q, list: $0) } }
        if lists.isEmpty { return [] }
        let replies = try await client.pipeline(lists.map { ["LLEN", $0.list] })
        return zip(lists, replies).map { ($0.queue, $0.list, Int($1.int ?? 0)) }
    }

    /// The queues publishers declared: kombu `SADD`s a binding for each queue it publishes to
    /// (`_kombu.binding.<exchange>` members `routing_key\x06\x16pattern\x06\x16queue`), so a queue appears here
    /// with its first message even when no worker or policy names it. Celery's own control and event exchanges
    /// (`*.pidbox`, `celeryev`) are left out. Found with `SCAN` (never `KEYS`), so a large keyspace costs round
    /// trips, not a stalled server.
    public func declaredQueues() async throws -> [String] {
        var scan = DeclaredQueueScan()
        var queues: [String] = []
        repeat { queues = try await declaredQueues(continuing: &scan, pages: 1_000) } while scan.passes == 0
        return queues
    }

    /// `declaredQueues`, a few `SCAN` pages at a time: what the last complete pass over the keyspace found, plus
    /// what the pass under way has found so far. A long-lived caller (the dispatcher's look every 10 s) keeps
    /// `scan` between calls, so a large keyspace — the Redis result backend keeps a key per task for a day — costs
    /// each call at most `pages` round trips (a full pass of a million keys took 1,000 of them, 0.86 s, and a
    /// millisecond of Redis's time each) instead of all of them at once; a new queue then shows within one pass.
    public func declaredQueues(continuing scan: inout DeclaredQueueScan, pages: Int, count: Int = 1_000) async throws -> [String] {
        for _ in 0..<pages {
            let r = try await client.send(["SCAN", scan.cursor, "MATCH", "_kombu.binding.*", "COUNT", String(count)]).array ?? []
            guard r.count == 2 else { break }
            scan.cursor = r[0].string ?? "0"
            for k in r[1].array ?? [] {
                guard let key = k.string else { continue }
                let exchange = String(key.dropFirst("_kombu.binding.".count))
                if !exchange.hasSuffix("pidbox") && exchange != "celeryev" { scan.found.insert(key) }
            }
            if scan.cursor == "0" {
                scan.lastPass = scan.found
                scan.found = []
                scan.passes += 1
                break
            }
        }
        let exchanges = scan.lastPass.union(scan.found).sorted()
        if exchanges.isEmpty { return [] }
        var queues = Set<String>()
        for reply in try await client.pipeline(exchanges.map { ["SMEMBERS", $0] }) {
            for m in reply.array ?? [] {
                guard let member = m.string, let queue = member.components(separatedBy: "\u{06}\u{16}").last, !queue.isEmpty else { continue }
                queues.insert(queue)
            }
        }
        return queues.sorted()
    }

    /// The queues whose Airflow lists may hold work: 'default' (where Airflow publishes unless a task names a
    /// queue) and every queue a publisher declared.
    public func publishedQueues() async throws -> [String] {
        Set(try await declaredQueues()).union(["default"]).sorted()
    }

    /// How many messages wait in each queue's lists before dispatch (staging, plain and priority siblings).
    public func ingressWaiting(queues: [String]) async throws -> [String: Int] {
        var out: [String: Int] = [:]
        for l in try await ingressLists(queues: queues) { out[l.queue, default: 0] += l.depth }
        return out
    }

    /// Gives the work Tandem holds back to Airflow's lists, each message unchanged, so stock Celery workers take
    /// it (a rollback to `airflow celery worker`): queued jobs of every datacenter queue, the message a
    /// dispatcher parked in its staging list, and jobs whose lease ran out (their worker is gone). Jobs a live
    /// lease holds stay with the worker running them (`stillLeased`). `queues` nil: every queue. Next in line
    /// afterwards: the jobs in dispatch order, then the parked message, then what Airflow published since.
    /// Each message moves in one script step (handback.lua), so a crash midway leaves every message in one place.
    public func handBack(queues only: Set<String>? = nil, batch: Int = 1_000) async throws -> HandBack {
        var out = HandBack()
        func wanted(_ q: String) -> Bool { only?.contains(q) ?? true }
        // a parked message came after everything already dispatched: it goes back first, so the dispatched jobs
        // (older) land on its consuming side
        let known = try await knownQueues()
        let names = Set(try await publishedQueues()).union(known.map(\.queue))
        for q in names.sorted() where wanted(q) {
            let n = Int(try await client.eval(BrokerScripts.unpark, keys: [Keys.staging(queue: q), q], args: []).int ?? 0)
            if n > 0 { out.moved[q, default: HandBack.Counts()].staged += n }
        }
        let queueKeys = known.filter { wanted($0.queue) }.map { Keys.queue(datacenter: $0.datacenter, queue: $0.queue) }
        let expired = try await leases().filter { wanted($0.queue) && $0.remainingMs < 0 }.map(\.jobID)
            .sorted { (Int64($0) ?? 0) > (Int64($1) ?? 0) }
        while true {
            let r = try await client.eval(BrokerScripts.handBack, keys: [Keys.leases] + queueKeys, args: [String(batch)] + expired).array ?? []
            let dropped = Int(r.first?.int ?? 0)
            out.dropped += dropped
            var moved = 0
            for i in stride(from: 1, to: r.count - 1, by: 2) {
                let queue = r[i + 1].string ?? ""
                if r[i].string == "lease" { out.moved[queue, default: HandBack.Counts()].expiredLeases += 1 } else {
                    out.moved[queue, default: HandBack.Counts()].queued += 1
                }
                moved += 1
            }
            if moved + dropped < batch { break }
        }
        // what a live lease holds, as it stands after the moves (one may have run out meanwhile: run again)
        out.stillLeased = try await leases().filter { wanted($0.queue) && $0.remainingMs >= 0 }
            .map { HandBack.Held(jobID: $0.jobID, owner: $0.owner, datacenter: $0.datacenter, queue: $0.queue, remainingMs: $0.remainingMs) }
        return out
    }

    /// Where a task waits in Redis before any worker recorded it: in Airflow's list of a queue (not dispatched),
    /// a datacenter queue (dispatched, not claimed), held under a lease, or dead-lettered. Found by its id in the
    /// raw message (kombu's headers are plain JSON), looking at most `limit` entries of each list, oldest first.
    public func locate(taskID: String, queues: [String], limit: Int = 10_000) async throws -> [TaskLocation] {
        let needle = "\"id\": \"\(taskID)\""
        func matches(_ raw: String?) -> Bool { raw?.contains(needle) == true || raw?.contains("\"id\":\"\(taskID)\"") == true }
        var found: [TaskLocation] = []
        // Airflow's lists are consumed from the right (RPOP): position 1 is next
        for q in queues {
            for list in Keys.dispatchSources(queue: q) {
                let items = try await client.send(["LRANGE", list, String(-limit), "-1"]).array ?? []
                for (i, v) in items.reversed().enumerated() where matches(v.string) {
                    found.append(.waitingInAirflowList(queue: q, list: list, position: i + 1))
                }
            }
        }
        func jobsMatching(_ ids: [String]) async throws -> [String: Bool] {
            var out: [String: Bool] = [:]
            for chunk in stride(from: 0, to: ids.count, by: 500).map({ Array(ids[$0..<min($0 + 500, ids.count)]) }) {
                let raws = try await client.pipeline(chunk.map { ["HGET", Keys.job($0), "raw"] })
                for (id, r) in zip(chunk, raws) where matches(r.string) { out[id] = true }
            }
            return out
        }
        for q in try await knownQueues() {
            let ids = (try await client.send(["LRANGE", Keys.queue(datacenter: q.datacenter, queue: q.queue), String(-limit), "-1"]).array ?? [])
                .compactMap(\.string).reversed().map { $0 }
            let hits = try await jobsMatching(ids)
            for (i, id) in ids.enumerated() where hits[id] == true {
                found.append(.queuedInDatacenter(datacenter: q.datacenter, queue: q.queue, jobID: id, position: i + 1))
            }
        }
        let leased = try await leases()
        let leasedHits = try await jobsMatching(leased.prefix(limit).map(\.jobID))
        for l in leased where leasedHits[l.jobID] == true {
            found.append(.leased(jobID: l.jobID, owner: l.owner, datacenter: l.datacenter, remainingMs: l.remainingMs))
        }
        let dead = try await deadLetters(limit: limit)
        let deadHits = try await jobsMatching(dead)
        for id in dead where deadHits[id] == true {
            found.append(.deadLettered(jobID: id, reason: try await job(id)["reason"] ?? ""))
        }
        for r in try await celeryReserved(limit: limit) where r.taskID == taskID {
            found.append(.reservedByCelery(ageMs: r.ageMs))
        }
        return found
    }

    /// Redis's memory use and limit (`INFO memory`).
    public func memory() async throws -> RedisMemory {
        let text = try await client.send(["INFO", "memory"]).string ?? ""
        var f: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {  // ("\r\n" is one Character in Swift)
            if let colon = line.firstIndex(of: ":") { f[String(line[..<colon])] = String(line[line.index(after: colon)...]) }
        }
        return RedisMemory(
            usedBytes: Int64(f["used_memory"] ?? "") ?? 0, maxBytes: Int64(f["maxmemory"] ?? "") ?? 0,
            policy: f["maxmemory_policy"] ?? "?")
    }

    /// The job hash (raw message, state, attempts, owner, reason...).
    public func job(_ id: String) async throws -> [String: String] {
        hash(try await client.send(["HGETALL", Keys.job(id)]))
    }

    /// Dead-lettered job ids, newest first.
    public func deadLetters(limit: Int = 100) async throws -> [String] {
        (try await client.send(["LRANGE", Keys.deadLetters, "0", String(limit - 1)]).array ?? []).compactMap(\.string)
    }

    /// Sends a dead-lettered message back to its ingress list (front), to be routed again.
    public func replay(jobID: String) async throws -> Bool {
        try await client.eval(BrokerScripts.replay, keys: [Keys.deadLetters], args: [jobID]).int == 1
    }

    /// Deletes a dead-lettered message.
    public func purge(jobID: String) async throws -> Bool {
        try await client.eval(BrokerScripts.purge, keys: [Keys.deadLetters], args: [jobID]).int == 1
    }

    /// Every lease: job, owner, token and milliseconds until expiry (negative: expired, awaiting reclaim).
    public func leases() async throws -> [(jobID: String, owner: String, token: Int64, datacenter: String, queue: String, remainingMs: Int64)] {
        let now = try await client.time().milliseconds
        let a = try await client.send(["ZRANGE", Keys.leases, "0", "-1", "WITHSCORES"]).array ?? []
        let ids = withScores(a)
        if ids.isEmpty { return [] }
        let f = try await client.pipeline(ids.map { ["HMGET", Keys.job($0.0), "owner", "token", "dc", "queue"] })
        return zip(ids, f).map { id, r in
            let v = r.array ?? []
            return (id.0, v.first?.string ?? "", v.count > 1 ? v[1].int ?? 0 : 0, v.count > 2 ? v[2].string ?? "" : "",
                v.count > 3 ? v[3].string ?? "" : "", id.1 - now)
        }
    }

    /// A `ZRANGE … WITHSCORES` reply as (member, score) pairs; scores are Redis-time milliseconds.
    private func withScores(_ a: [RedisValue]) -> [(String, Int64)] {
        stride(from: 0, to: a.count - 1, by: 2).map { (i: Int) -> (String, Int64) in
            let member = a[i].string ?? ""
            let score: Int64 = a[i + 1].int ?? Int64(Double(a[i + 1].string ?? "") ?? 0)
            return (member, score)
        }
    }

    private func hash(_ reply: RedisValue) -> [String: String] {
        let a = reply.array ?? []
        var h: [String: String] = [:]
        var i = 0
        while i + 1 < a.count {
            if let k = a[i].string { h[k] = a[i + 1].string ?? "" }
            i += 2
        }
        return h
    }
}
