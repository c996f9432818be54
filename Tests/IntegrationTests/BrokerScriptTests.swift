import CeleryWire
import ClientSupport
import Foundation
import Logging
import Redis
import TandemCore
import TandemRedis
import Testing
import TestSupport

/// Each Lua script against a real redis-server: the moves, the refusals, and the invariant it states.
@Suite("Broker scripts (real Redis)")
struct BrokerScriptTests {
    let server: RedisServer
    let broker: RedisBroker

    init() async throws {
        server = try RedisServer.start()
        broker = RedisBroker(configuration: try RedisConfiguration(url: server.url), logger: Logger(label: "test"))
        try await broker.connect()
    }

    func publish(_ queue: String = "default", priority: Int? = nil, name: String = "execute_command", id: String? = nil)
        async throws -> String
    {
        let tid = id ?? UUID().uuidString
        let m = CeleryPublisher.message(
            taskName: name, id: tid, args: [.array(["airflow", "tasks", "run", "d", "t", "r"])], queue: queue,
            priority: priority)
        _ = try await broker.client.send(["LPUSH", m.list, m.element])
        return tid
    }

    func taskID(_ job: ClaimedJob) throws -> String { try CeleryTask.decode(raw: job.raw).id }

    /// Claims the next job of `datacenter` for `worker`, lets its lease lapse (cut to 1 ms by its holder: a short
    /// lease could lapse before the claim's reply on a loaded host) and has the dispatcher's reclaim take it back.
    func claimThenReclaim(worker: String, datacenter: String) async throws -> ClaimedJob {
        let j = try #require(try await broker.claim(workerID: worker, datacenter: datacenter, queues: ["default"], max: 1, leaseMs: 60000).first)
        #expect(try await broker.renew(workerID: worker, jobs: [(j.jobID, j.token)], leaseMs: 1) == [true])
        try await Task.sleep(for: .milliseconds(20))
        #expect(try await broker.reclaimExpired(maxAttempts: 3, limit: 10).map(\.jobID) == [j.jobID])
        return j
    }

    @Test("dispatch moves messages in kombu's order: plain list oldest first, then priority lists")
    func dispatchOrder() async throws {
        let low = try await publish(priority: 9)
        let a = try await publish()
        let b = try await publish()
        let mid = try await publish(priority: 4)
        let moved = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        #expect(moved == 4)
        for list in Keys.ingressLists(queue: "default") {
            #expect(try await broker.client.send(["LLEN", list]).int == 0)
        }
        let jobs = try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 10, leaseMs: 30000)
        #expect(try jobs.map(taskID) == [a, b, mid, low])
        #expect(jobs.allSatisfy { $0.datacenter == "east" && $0.queue == "default" && $0.attempts == 1 })
        #expect(jobs[2].ingressList == "default\u{06}\u{16}3")
    }

    @Test("an idle dispatcher's BLMOVE parks the message in staging; dispatch drains staging first, oldest first")
    func stagingFirst() async throws {
        let first = try await publish()
        let second = try await publish()
        #expect(try await broker.waitForIngress(queue: "default", timeout: .milliseconds(100)))
        #expect(try await broker.client.send(["LLEN", Keys.staging(queue: "default")]).int == 1)
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 2)
        let jobs = try await broker.claim(workerID: "w", datacenter: "east", queues: ["default"], max: 10, leaseMs: 1000)
        #expect(try jobs.map(taskID) == [first, second])
        #expect(jobs.allSatisfy { $0.ingressList == "default" })  // replay goes back to kombu's list, not staging
        #expect(try await !broker.waitForIngress(queue: "default", timeout: .milliseconds(50)))
    }

    @Test("the dispatcher's broker (every call on its loop) waits, moves and reads on that loop: a held-up loop holds its calls")
    func dispatcherBrokerOnItsLoop() async throws {
        let loop = EventLoopThread(name: "test-dispatch")
        let onLoop = RedisBroker(
            configuration: try RedisConfiguration(url: server.url), logger: Logger(label: "test"), loop: loop, allCallsOnLoop: true)
        try await onLoop.connect()
        defer { onLoop.close() }
        let id = try await publish()
        try await withTaskExecutorPreference(loop) { () async throws -> Void in
            #expect(try await onLoop.waitForIngress(queue: "default", timeout: .seconds(5)))
            #expect(try await onLoop.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 1)
            #expect(loop.inLoop, "the cycle resumed on its loop")
        }
        // while the loop is held, a call made from elsewhere gets no answer: its reply is read on the loop
        let hold = try await LoopHold.start(loop)
        let call = Task { () async throws -> Bool in
            _ = try await onLoop.now()
            return hold.isReleased
        }
        try await Task.sleep(for: .milliseconds(300))
        await hold.release()
        #expect(try await call.value, "the reply came before the loop was let go: not driven by the loop")
        let jobs = try await broker.claim(workerID: "w", datacenter: "east", queues: ["default"], max: 10, leaseMs: 1000)
        #expect(try jobs.map(taskID) == [id])
    }

    @Test("INFO from a server older than Redis 7 reads as too old, with what to do (connect refuses it); this one (7.x) does not")
    func redisVersionCheck() async throws {
        let problem = RedisBroker.versionProblem(info: "# Server\r\nredis_version:6.2.14\r\nredis_mode:standalone\r\n")
        #expect(problem?.contains("6.2.14") == true && problem?.contains("Redis 7.0 or later") == true, "\(String(describing: problem))")
        #expect(RedisBroker.versionProblem(info: "# Server\r\nredis_version:7.0.15\r\n") == nil)
        #expect(RedisBroker.versionProblem(info: "# Server\r\nredis_version:8.2.1\r\n") == nil)
        #expect(RedisBroker.versionProblem(info: "") == nil, "no version said: not checked")
        let info = try await broker.client.send(["INFO", "server"]).string ?? ""
        #expect(info.contains("redis_version:") && RedisBroker.versionProblem(info: info) == nil, "the test server: \(info.prefix(120))")
    }

    @Test("a full Redis (maxmemory, noeviction) refuses a plain write but runs the scripts that keep work safe: renew, heartbeat, leadership, claim")
    func scriptsRunWhenRedisIsFull() async throws {
        _ = try await publish()
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 1)
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory", "1"])
        await #expect(throws: RedisError.self, "a plain write is refused") { _ = try await broker.client.send(["SET", "k", "v"]) }
        let jobs = try await broker.claim(workerID: "w", datacenter: "east", queues: ["default"], max: 1, leaseMs: 5000)
        #expect(jobs.count == 1, "claim runs while Redis is full")
        let renewed = try await broker.renew(workerID: "w", jobs: jobs.map { ($0.jobID, $0.token) }, leaseMs: 5000)
        #expect(renewed == [true], "renew runs while Redis is full")
        let lead = try await broker.lead(candidate: "d1", leaseMs: 2000)
        #expect(lead.isLeader, "leadership is taken while Redis is full")
        _ = try await broker.heartbeat(
            WorkerStatus(workerID: "w", datacenter: "east", slots: 1, busy: 1, queues: ["default"], hostname: "h", pid: 1,
                runningJobs: [], aheadJobs: [], state: .running, lastSeenMs: 0), ttlSeconds: 60)
        #expect(try await broker.ack(jobID: jobs[0].jobID, token: jobs[0].token) == .done, "ack frees memory: it runs too")
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory", "0"])
    }

    @Test("dispatch honours max and leaves the rest in the ingress list")
    func dispatchMax() async throws {
        for _ in 0..<5 { _ = try await publish() }
        #expect(try await broker.dispatch(queue: "default", to: "west", max: 3, epoch: nil) == 3)
        #expect(try await broker.client.send(["LLEN", "default"]).int == 2)
        #expect(try await broker.client.send(["LLEN", Keys.queue(datacenter: "west", queue: "default")]).int == 3)
    }

    @Test("dispatch with a stale leader epoch is refused and moves nothing")
    func dispatchEpochFence() async throws {
        _ = try await publish()
        _ = try await broker.client.send(["HSET", Keys.leader, "epoch", "7"])
        await #expect(throws: RedisError.self) {
            _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: 6)
        }
        #expect(try await broker.client.send(["LLEN", "default"]).int == 1)
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: 7) == 1)
    }

    @Test("claim records owner, a growing token and a deadline from Redis TIME in the same step")
    func claimRecordsLease() async throws {
        for _ in 0..<3 { _ = try await publish() }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        let before = try await broker.now()
        let jobs = try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 2, leaseMs: 5000)
        let after = try await broker.now()
        #expect(jobs.count == 2)
        #expect(jobs[1].token > jobs[0].token)
        for j in jobs {
            // TIME at the claim + TTL (bracketed by TIME before and after: a loaded suite once took > 1 s between)
            #expect(j.leaseDeadlineMs >= before + 5000 && j.leaseDeadlineMs <= after + 5000)
            let h = try await BrokerInspector(client: broker.client).job(j.jobID)
            #expect(h["owner"] == "w1")
            #expect(h["state"] == "leased")
            #expect(h["token"] == String(j.token))
            let score = try await broker.client.send(["ZSCORE", Keys.leases, j.jobID])
            #expect(score.string.flatMap { Int64($0) } == j.leaseDeadlineMs)
        }
        // the third is still queued, not leased
        #expect(try await broker.client.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 1)
    }

    @Test("claim takes from the queues in the order given and never from another datacenter")
    func claimQueueOrderAndDatacenter() async throws {
        _ = try await publish("reports")
        let d = try await publish("default")
        _ = try await broker.dispatch(queue: "reports", to: "west", max: 10, epoch: nil)
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        let east = try await broker.claim(workerID: "e", datacenter: "east", queues: ["reports", "default"], max: 5, leaseMs: 1000)
        #expect(try east.map(taskID) == [d])
        let west = try await broker.claim(workerID: "w", datacenter: "west", queues: ["default", "reports"], max: 5, leaseMs: 1000)
        #expect(west.map(\.queue) == ["reports"])
    }

    @Test("renew extends only the current holder's lease")
    func renewChecksOwnerAndToken() async throws {
        _ = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil)
        let j = try #require(try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 1, leaseMs: 1000).first)
        let ok = try await broker.renew(workerID: "w1", jobs: [(j.jobID, j.token), (j.jobID, j.token + 1)], leaseMs: 60000)
        #expect(ok == [true, false])
        #expect(try await broker.renew(workerID: "w2", jobs: [(j.jobID, j.token)], leaseMs: 60000) == [false])
        let score = try await broker.client.send(["ZSCORE", Keys.leases, j.jobID]).string.flatMap { Int64($0) } ?? 0
        #expect(score > j.leaseDeadlineMs + 50000)
    }

    @Test("ack with the current token removes lease and job; a stale token changes nothing")
    func ackFencing() async throws {
        _ = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil)
        let j = try #require(try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 1, leaseMs: 1000).first)
        #expect(try await broker.ack(jobID: j.jobID, token: j.token - 1) == .fenced)
        #expect(try await broker.client.send(["EXISTS", Keys.job(j.jobID)]).int == 1)
        #expect(try await broker.jobExists(jobID: j.jobID), "leased: still on the broker")
        #expect(try await broker.ack(jobID: j.jobID, token: j.token) == .done)
        #expect(try await broker.client.send(["EXISTS", Keys.job(j.jobID)]).int == 0)
        #expect(try await broker.client.send(["ZCARD", Keys.leases]).int == 0)
        // the same ack again (its first reply lost): refused, and the job is gone — how the worker tells that its
        // first ack landed from a lease another claim holds (which keeps the job on the broker)
        #expect(try await broker.ack(jobID: j.jobID, token: j.token) == .fenced)
        #expect(try await !broker.jobExists(jobID: j.jobID))
    }

    @Test("a claim leaves a capacity token only once its queue is down to the dispatcher's refill mark")
    func capacityTokenAtRefillMark() async throws {
        for _ in 0..<6 { _ = try await publish() }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 6, epoch: nil)
        func claimOne() async throws {
            _ = try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 1, leaseMs: 60000)
        }
        func tokens() async throws -> Int64 { try await broker.client.send(["LLEN", Keys.capacity]).int ?? -1 }
        // no mark (a dispatcher of an older release): every claim leaves a token
        try await claimOne()
        #expect(try await tokens() == 1)
        _ = try await broker.client.send(["DEL", Keys.capacity])
        // mark at depth 2: 5 -> 4 and 4 -> 3 leave none, 3 -> 2 leaves one
        _ = try await broker.client.send(["HSET", Keys.refillMarks, Keys.queue(datacenter: "east", queue: "default"), "2"])
        try await claimOne()
        try await claimOne()
        #expect(try await tokens() == 0)
        try await claimOne()
        #expect(try await tokens() == 1)
    }

    @Test("claims count each worker process's jobs; released only grows; a new process starts from zero; a freed slot wakes the dispatcher")
    func slotAccounting() async throws {
        for _ in 0..<5 { _ = try await publish() }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 5, epoch: nil)
        func claim(_ max: Int, _ incarnation: String, released: Int) async throws -> Int {
            try await broker.claim(
                workerID: "w1", datacenter: "east", queues: ["default"], max: max, leaseMs: 60000,
                slots: SlotReport(incarnation: incarnation, released: released)
            ).count
        }
        func counts() async throws -> [String?] {
            (try await broker.client.send(["HMGET", Keys.worker("w1"), "claimed", "released"]).array ?? []).map(\.string)
        }
        func tokens() async throws -> Int64 { try await broker.client.send(["LLEN", Keys.capacity]).int ?? -1 }
        #expect(try await claim(3, "p1", released: 0) == 3)
        #expect(try await counts() == ["3", "0"])
        // the dispatcher wants waking only once the queue is empty
        _ = try await broker.client.send(["HSET", Keys.refillMarks, Keys.queue(datacenter: "east", queue: "default"), "0"])
        _ = try await broker.client.send(["DEL", Keys.capacity])
        // an empty claim that reports two freed slots (the queue holds 2, above the mark): counted, no token
        #expect(try await claim(0, "p1", released: 2) == 0)
        #expect(try await counts() == ["3", "2"])
        #expect(try await tokens() == 0)
        // a report older than one already recorded does not lower it
        #expect(try await claim(1, "p1", released: 1) == 1)
        #expect(try await counts() == ["4", "2"])
        #expect(try await claim(1, "p1", released: 2) == 1)
        #expect(try await counts() == ["5", "2"])
        _ = try await broker.client.send(["DEL", Keys.capacity])
        // the queue is empty now: a freed slot alone leaves a token (the dispatcher may have work for it)
        #expect(try await claim(0, "p1", released: 3) == 0)
        #expect(try await tokens() == 1)
        _ = try await broker.client.send(["DEL", Keys.capacity])
        // ... and an empty claim that frees nothing leaves none
        #expect(try await claim(0, "p1", released: 3) == 0)
        #expect(try await tokens() == 0)
        // the worker restarted under the same id: its counts start again
        #expect(try await claim(1, "p2", released: 0) == 0)
        #expect(try await counts() == ["0", "0"])
    }

    @Test("acks sent at once ride together, and each still gets its own answer: stale tokens refused, the rest acked")
    func batchedAcks() async throws {
        for _ in 0..<40 { _ = try await publish() }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 40, epoch: nil)
        let jobs = try await broker.claim(workerID: "w1", datacenter: "east", queues: ["default"], max: 40, leaseMs: 60000)
        #expect(jobs.count == 40)
        let broker = self.broker
        // every fourth ack carries a stale token
        let answers = await withTaskGroup(of: (String, FencedOutcome?).self) { group in
            for (i, j) in jobs.enumerated() {
                group.addTask { (j.jobID, try? await broker.ack(jobID: j.jobID, token: i % 4 == 0 ? j.token - 1 : j.token)) }
            }
            var out: [String: FencedOutcome?] = [:]
            for await (id, o) in group { out[id] = o }
            return out
        }
        for (i, j) in jobs.enumerated() {
            #expect(answers[j.jobID] == (i % 4 == 0 ? .fenced : .done), "job \(j.jobID)")
            #expect(try await broker.client.send(["EXISTS", Keys.job(j.jobID)]).int == (i % 4 == 0 ? 1 : 0))
        }
        #expect(try await broker.client.send(["ZCARD", Keys.leases]).int == 10)
        #expect(try await broker.client.send(["HGET", Keys.stats, "acked"]).string == "30")
    }

    @Test("an expired lease is reclaimed to the FRONT of its queue; the old holder is then fenced")
    func reclaimToFront() async throws {
        let first = try await publish()
        let second = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        // a lease long enough that "not expired yet" holds however slow the machine is; then cut to 1 ms by its
        // holder (a 1.5 s lease once expired between the claim and the first look on a loaded CI host)
        let j = try #require(try await broker.claim(workerID: "dead", datacenter: "east", queues: ["default"], max: 1, leaseMs: 60000).first)
        #expect(try taskID(j) == first)
        #expect(try await broker.reclaimExpired(maxAttempts: 3, limit: 10).isEmpty)  // not expired yet
        #expect(try await broker.renew(workerID: "dead", jobs: [(j.jobID, j.token)], leaseMs: 1) == [true])
        try await Task.sleep(for: .milliseconds(20))
        let r = try await broker.reclaimExpired(maxAttempts: 3, limit: 10)
        #expect(r == [ReclaimedJob(jobID: j.jobID, disposition: .requeued, attempts: 1)])
        let again = try await broker.claim(workerID: "alive", datacenter: "east", queues: ["default"], max: 10, leaseMs: 10000)
        #expect(try again.map(taskID) == [first, second])
        #expect(again[0].attempts == 2)
        #expect(again[0].token > j.token)
        #expect(try await broker.ack(jobID: j.jobID, token: j.token) == .fenced)
        #expect(try await broker.renew(workerID: "dead", jobs: [(j.jobID, j.token)], leaseMs: 1000) == [false])
        #expect(try await broker.ack(jobID: j.jobID, token: again[0].token) == .done)
    }

    @Test("a late ack (lease expired and reclaimed, nobody has claimed the job again) is accepted and takes the queued retry away — even after the queue moved to another datacenter; once claimed again it is refused")
    func lateAckBeforeAnotherClaim() async throws {
        let first = try await publish()
        let behind = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        let j = try await claimThenReclaim(worker: "cut-off", datacenter: "east")
        #expect(try taskID(j) == first)
        // east is lost meanwhile: its queue, the reclaimed job at the front, moves to west
        #expect(try await broker.rebalance(queue: "default", from: "east", to: "west", max: 100, epoch: nil) == 2)
        // the cut-off worker's task had finished; its ack arrives now
        #expect(try await broker.ack(jobID: j.jobID, token: j.token) == .doneLate)
        #expect(try await !broker.jobExists(jobID: j.jobID))
        #expect(try await broker.client.send(["HGET", Keys.stats, "acked_late"]).string == "1")
        // only the job behind it is left to run, nothing of the acked one
        let next = try await broker.claim(workerID: "w", datacenter: "west", queues: ["default"], max: 10, leaseMs: 10000)
        #expect(try next.map(taskID) == [behind])
        #expect(try await broker.client.send(["LLEN", Keys.queue(datacenter: "west", queue: "default")]).int == 0)

        // the other order: the reclaimed job is claimed again first; the late ack is refused and the new holder keeps it
        let third = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "west", max: 10, epoch: nil)
        let k = try await claimThenReclaim(worker: "cut-off", datacenter: "west")
        #expect(try taskID(k) == third)
        let retry = try #require(try await broker.claim(workerID: "w", datacenter: "west", queues: ["default"], max: 1, leaseMs: 10000).first)
        #expect(retry.jobID == k.jobID && retry.token > k.token)
        #expect(try await broker.ack(jobID: k.jobID, token: k.token) == .fenced)
        #expect(try await broker.ack(jobID: k.jobID, token: retry.token) == .done)
    }

    @Test("a job whose lease expires max-attempts times goes to the dead-letter queue with its history")
    func reclaimToDeadLetter() async throws {
        _ = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil)
        for attempt in 1...2 {
            let j = try #require(try await broker.claim(workerID: "w\(attempt)", datacenter: "east", queues: ["default"], max: 1, leaseMs: 50).first)
            #expect(j.attempts == attempt)
            try await Task.sleep(for: .milliseconds(100))
            let r = try await broker.reclaimExpired(maxAttempts: 2, limit: 10)
            #expect(r.first?.disposition == (attempt < 2 ? .requeued : .dead))
        }
        let inspector = BrokerInspector(client: broker.client)
        let dead = try await inspector.deadLetters()
        #expect(dead.count == 1)
        let h = try await inspector.job(dead[0])
        #expect(h["state"] == "dead")
        #expect(h["attempts"] == "2")
        #expect(h["reason"]?.contains("max attempts 2") == true)
        #expect(h["raw"]?.isEmpty == false)
        // replay puts the message back into its ingress list, unchanged
        #expect(try await inspector.replay(jobID: dead[0]))
        #expect(try await broker.client.send(["LLEN", "default"]).int == 1)
        #expect(try await inspector.deadLetters().isEmpty)
        #expect(try await !inspector.replay(jobID: dead[0]))
    }

    @Test("a claim retried under its id (its reply lost) answers the same jobs, tokens and attempts, leases renewed, and takes no more")
    func claimRetriedUnderItsID() async throws {
        for _ in 0..<4 { _ = try await publish() }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 4, epoch: nil)
        func claim(_ id: String?, max: Int = 2, worker: String = "w", leaseMs: Int64 = 1000) async throws -> [ClaimedJob] {
            try await broker.claim(
                workerID: worker, datacenter: "east", queues: ["default"], max: max, leaseMs: leaseMs,
                slots: SlotReport(incarnation: "p1", released: 0, claimID: id))
        }
        let first = try await claim("p1-1")
        #expect(first.count == 2)
        let again = try await claim("p1-1", max: 5, leaseMs: 60_000)
        #expect(again.map(\.jobID) == first.map(\.jobID))
        #expect(again.map(\.token) == first.map(\.token))
        #expect(again.map(\.attempts) == [1, 1])
        #expect(again.map(\.raw) == first.map(\.raw))
        #expect(zip(again, first).allSatisfy { $0.leaseDeadlineMs > $1.leaseDeadlineMs }, "the retry renews the leases")
        let leases = try await broker.client.send(["ZSCORE", Keys.leases, first[0].jobID]).int
        #expect(leases == again[0].leaseDeadlineMs)
        #expect(try await broker.client.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int == 2, "took no more")
        #expect(try await broker.client.send(["HGET", Keys.worker("w"), "claimed"]).int == 2, "counted once")
        // one of them acked meanwhile: a retry answers only the one still leased to this worker
        #expect(try await broker.ack(jobID: first[0].jobID, token: first[0].token) == .done)
        #expect(try await claim("p1-1").map(\.jobID) == [first[1].jobID])
        // a new id claims afresh; another worker sending the same id claims for itself, nothing of this worker's
        let next = try await claim("p1-2", max: 1)
        #expect(next.count == 1 && !first.map(\.jobID).contains(next[0].jobID))
        let other = try await claim("p1-2", max: 1, worker: "other")
        #expect(other.count == 1 && other[0].jobID != next[0].jobID)
        // no id: a claim that is never retried (the idle slot report) records nothing
        #expect(try await claim(nil, max: 0).isEmpty)
        #expect(try await claim("p1-2", max: 5).map(\.jobID) == next.map(\.jobID), "still the retry of p1-2")
    }

    @Test("requeue and dead-letter are refused for a stale token")
    func requeueAndDeadLetterFencing() async throws {
        _ = try await publish()
        _ = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 2, epoch: nil)
        let jobs = try await broker.claim(workerID: "w", datacenter: "east", queues: ["default"], max: 2, leaseMs: 10000)
        #expect(try await broker.requeue(jobID: jobs[0].jobID, token: 0, refundAttempt: true) == .fenced)
        #expect(try await broker.requeue(jobID: jobs[0].jobID, token: jobs[0].token, refundAttempt: true) == .done)
        #expect(try await broker.deadLetter(jobID: jobs[1].jobID, token: 0, reason: "x") == .fenced)
        #expect(try await broker.deadLetter(jobID: jobs[1].jobID, token: jobs[1].token, reason: "bad message") == .done)
        #expect(try await broker.jobExists(jobID: jobs[1].jobID), "a dead letter stays on the broker")
        let h = try await BrokerInspector(client: broker.client).job(jobs[1].jobID)
        #expect(h["reason"] == "bad message")
        let back = try await broker.claim(workerID: "w2", datacenter: "east", queues: ["default"], max: 5, leaseMs: 10000)
        #expect(back.map(\.jobID) == [jobs[0].jobID])
        #expect(back[0].attempts == 1)  // refunded: it never started
        #expect(try await BrokerInspector(client: broker.client).purge(jobID: jobs[1].jobID))
        #expect(try await broker.client.send(["EXISTS", Keys.job(jobs[1].jobID)]).int == 0)
    }

    @Test("rebalance moves queued work to another datacenter, oldest first, ahead of its own backlog")
    func rebalanceOrder() async throws {
        var eastIDs: [String] = []
        for _ in 0..<3 { eastIDs.append(try await publish()) }
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        let westOwn = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "west", max: 10, epoch: nil)
        #expect(try await broker.rebalance(queue: "default", from: "east", to: "west", max: 100, epoch: nil) == 3)
        let jobs = try await broker.claim(workerID: "w", datacenter: "west", queues: ["default"], max: 10, leaseMs: 1000)
        #expect(try jobs.map(taskID) == eastIDs + [westOwn])
        #expect(jobs.allSatisfy { $0.datacenter == "west" })
    }

    @Test("rebalance drops a queue entry whose job is gone instead of giving it a bare record a worker would claim")
    func rebalanceDropsGoneJobs() async throws {
        let kept = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil)
        _ = try await broker.client.send(["LPUSH", Keys.queue(datacenter: "east", queue: "default"), "gone-job"])
        #expect(try await broker.rebalance(queue: "default", from: "east", to: "west", max: 100, epoch: nil) == 1)
        #expect(try await broker.client.send(["EXISTS", Keys.job("gone-job")]).int == 0)
        let jobs = try await broker.claim(workerID: "w", datacenter: "west", queues: ["default"], max: 10, leaseMs: 1000)
        #expect(try jobs.map(taskID) == [kept])
    }

    @Test("handback gives every message no live worker holds back to its Airflow list, byte for byte, in dispatch order ahead of newer work; a live lease stays; an orphaned queue entry is dropped")
    func handBackToCelery() async throws {
        var raw: [String: String] = [:]  // task id -> the element exactly as published
        func published(_ id: String, priority: Int? = nil) async throws {
            _ = try await publish(priority: priority, id: id)
            let list = priority == nil ? "default" : "default\u{06}\u{16}9"
            raw[id] = try await broker.client.send(["LINDEX", list, "0"]).string
        }
        for id in ["m0", "m1", "m2", "m3"] { try await published(id) }
        try await published("low", priority: 9)
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 2, epoch: nil) == 2)  // m0, m1
        #expect(try await broker.dispatch(queue: "default", to: "west", max: 10, epoch: nil) == 3)  // m2, m3, low
        try await published("m4")
        #expect(try await broker.waitForIngress(queue: "default", timeout: .milliseconds(100)))  // m4 parked
        try await published("m5")  // published since: stays where it is, behind the handed-back work
        // east: m0 claimed and its worker gone (lease ran out); west: m2 claimed and running (live lease)
        let gone = try #require(try await broker.claim(workerID: "east-1", datacenter: "east", queues: ["default"], max: 1, leaseMs: 60000).first)
        #expect(try taskID(gone) == "m0")
        #expect(try await broker.renew(workerID: "east-1", jobs: [(gone.jobID, gone.token)], leaseMs: 1) == [true])
        let running = try #require(try await broker.claim(workerID: "west-1", datacenter: "west", queues: ["default"], max: 1, leaseMs: 60000).first)
        #expect(try taskID(running) == "m2")
        // an entry whose job hash is gone (nothing to hand back)
        _ = try await broker.client.send(["LPUSH", Keys.queue(datacenter: "east", queue: "default"), "999999"])
        try await Task.sleep(for: .milliseconds(20))

        let done = try await BrokerInspector(client: broker.client).handBack(batch: 2)
        #expect(done.moved["default"] == HandBack.Counts(queued: 3, staged: 1, expiredLeases: 1), "\(done)")
        #expect(done.stillLeased.map(\.jobID) == [running.jobID] && done.stillLeased.first?.owner == "west-1")
        #expect(done.dropped == 1)
        // kombu consumes each list from the right: what a stock worker takes next, in order
        let plain = (try await broker.client.send(["LRANGE", "default", "0", "-1"]).array ?? []).map { $0.string ?? "" }
        #expect(try plain.reversed().map { try CeleryTask.decode(raw: Array($0.utf8)).id } == ["m0", "m1", "m3", "m4", "m5"])
        let prio = (try await broker.client.send(["LRANGE", "default\u{06}\u{16}9", "0", "-1"]).array ?? []).map { $0.string ?? "" }
        #expect(try prio.map { try CeleryTask.decode(raw: Array($0.utf8)).id } == ["low"])
        for element in plain + prio {
            let id = try CeleryTask.decode(raw: Array(element.utf8)).id
            #expect(raw[id] == element, "\(id) goes back byte for byte")
        }
        // Tandem keeps only the job under the live lease
        for dc in ["east", "west"] {
            #expect(try await broker.client.send(["LLEN", Keys.queue(datacenter: dc, queue: "default")]).int == 0)
        }
        #expect(try await broker.client.send(["LLEN", Keys.staging(queue: "default")]).int == 0)
        #expect(try await broker.client.send(["ZRANGE", Keys.leases, "0", "-1"]).array?.map { $0.string ?? "" } == [running.jobID])
        #expect(try await broker.client.send(["EXISTS", Keys.job(gone.jobID)]).int == 0)
        #expect(try await broker.client.send(["EXISTS", Keys.job(running.jobID)]).int == 1)
        // the script checks each lease against Redis's clock itself: one renewed since it was read stays
        let raced = try await broker.client.eval(BrokerScripts.handBack, keys: [Keys.leases], args: ["10", running.jobID]).array ?? []
        #expect(raced.count == 1 && raced.first?.int == 0, "a live lease is never handed back: \(raced)")
        // again: nothing more to give; the running job is still named
        let again = try await BrokerInspector(client: broker.client).handBack()
        #expect(again.total == 0 && again.stillLeased.count == 1)
    }

    @Test("handback runs while Redis is full (maxmemory, noeviction: Airflow's publishes refused), when a rollback is most likely")
    func handBackWhenRedisIsFull() async throws {
        for id in ["a", "b"] { _ = try await publish(id: id) }
        #expect(try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil) == 1)  // a
        #expect(try await broker.waitForIngress(queue: "default", timeout: .milliseconds(100)))  // b parked
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory", "1"])
        defer { Task { _ = try? await broker.client.send(["CONFIG", "SET", "maxmemory", "0"]) } }
        await #expect(throws: RedisError.self, "a plain write is refused") { _ = try await broker.client.send(["SET", "k", "v"]) }
        let done = try await BrokerInspector(client: broker.client).handBack()
        #expect(done.moved["default"] == HandBack.Counts(queued: 1, staged: 1, expiredLeases: 0), "\(done)")
        let plain = (try await broker.client.send(["LRANGE", "default", "0", "-1"]).array ?? []).map { $0.string ?? "" }
        #expect(try plain.reversed().map { try CeleryTask.decode(raw: Array($0.utf8)).id } == ["a", "b"])
        _ = try await broker.client.send(["CONFIG", "SET", "maxmemory", "0"])
    }

    @Test("adopt restores a Celery reservation as kombu does: through the exchange's binding, to its priority sibling, marked redelivered; an age under the timeout is reported; kombu's mutex or a changed entry leaves it alone")
    func adoptCeleryReservations() async throws {
        let c = broker.client
        let now = Double(try await c.time().milliseconds) / 1000
        // kombu's shapes: a binding of exchange 'default' (routing key 'default' -> queue 'default'); each unacked
        // value is [payload, exchange, routing_key], reserved at the index's score (the Celery host's time())
        _ = try await c.send(["SADD", "_kombu.binding.default", "default\u{06}\u{16}\u{06}\u{16}default"])
        func reserve(_ tag: String, priority: Int, exchange: String, routingKey: String, at: Double) async throws -> String {
            let m = CeleryPublisher.message(taskName: "execute_command", id: tag + "-task",
                args: [.array(["airflow", "tasks", "run", "d", "t", .string(tag)])], queue: "default", priority: priority)
            let payload = try JSONValue.parse(m.element)
            let stored = JSONValue.array([payload, .string(exchange), .string(routingKey)]).serialized(style: .python)
            _ = try await c.send(["HSET", "unacked", tag, stored])
            _ = try await c.send(["ZADD", "unacked_index", String(at), tag])
            return stored
        }
        _ = try await reserve("old", priority: 7, exchange: "default", routingKey: "default", at: now - 90_000)
        _ = try await reserve("anon", priority: 0, exchange: "", routingKey: "default", at: now - 10)
        _ = try await reserve("lost", priority: 0, exchange: "nowhere", routingKey: "x", at: now - 100_000)
        let i = BrokerInspector(client: c)
        let found = Dictionary(uniqueKeysWithValues: try await i.celeryReserved().map { ($0.deliveryTag, $0) })
        let old = try #require(found["old"]), anon = try #require(found["anon"]), lost = try #require(found["lost"])
        #expect(try await i.celeryReserved().map(\.deliveryTag) == ["lost", "old", "anon"], "oldest first")
        #expect(old.taskID == "old-task" && old.airflowTarget == "d.t old")
        #expect(old.lists == ["default\u{06}\u{16}6"], "priority 7 goes to kombu's step 6 sibling")
        #expect(anon.lists == ["default"], "the anonymous exchange routes by the routing key itself")
        #expect(lost.lists.isEmpty)
        #expect((old.ageMs ?? 0) >= 89_000_000 && (anon.ageMs ?? 0) < 60_000)
        #expect(try await i.adopt(lost) == .unroutable)

        // a Celery worker restoring right now holds kombu's mutex: nothing moves
        _ = try await c.send(["SET", "unacked_mutex", "celery", "PX", "60000"])
        #expect(try await i.adopt(old) == .mutexHeld)
        _ = try await c.send(["DEL", "unacked_mutex"])
        // the entry changed since it was read (acked and reused, or restored by Celery): left to Celery
        var stale = anon
        stale.stored += " "
        #expect(try await i.adopt(stale) == .gone)
        #expect(try await c.send(["HEXISTS", "unacked", "anon"]).int == 1)

        #expect(try await i.adopt(old) == .restored(lists: ["default\u{06}\u{16}6"]))
        let element = try #require(try await c.send(["LINDEX", "default\u{06}\u{16}6", "0"]).string)
        let envelope = try KombuEnvelope.decode(Array(element.utf8))
        #expect(envelope.redelivered && envelope.headers["redelivered"]?.bool == true)
        #expect(try CeleryTask.decode(raw: Array(element.utf8)).id == "old-task")
        #expect(try await c.send(["HEXISTS", "unacked", "old"]).int == 0)
        #expect(try await c.send(["ZSCORE", "unacked_index", "old"]).string == nil)
        #expect(try await i.adopt(old) == .gone, "twice: the second finds it gone")
    }

    @Test("the key layout: recorded by the first process to connect, kept by later ones; a layout newer than this build's is refused at connect with what to do")
    func keyLayoutGuard() async throws {
        #expect(try await broker.client.send(["GET", Keys.layout]).string == String(Keys.layoutVersion))
        #expect(RedisBroker.layoutProblem(stored: String(Keys.layoutVersion)) == nil)
        #expect(RedisBroker.layoutProblem(stored: "0") == nil, "an older layout is a newer build's to migrate")
        #expect(RedisBroker.layoutProblem(stored: "banana")?.contains("not a layout version") == true)
        // a newer Tandem moved the layout on: this build must not run against it
        _ = try await broker.client.send(["SET", Keys.layout, String(Keys.layoutVersion + 1)])
        let old = RedisBroker(configuration: try RedisConfiguration(url: server.url), logger: Logger(label: "test"))
        defer { old.close() }
        do {
            try await old.connect()
            Issue.record("connect accepted a newer key layout")
        } catch {
            #expect("\(error)".contains("key layout \(Keys.layoutVersion + 1), written by a newer Tandem") && "\(error)".contains("upgrade"), "\(error)")
        }
        #expect(try await broker.client.send(["GET", Keys.layout]).string == String(Keys.layoutVersion + 1), "left as it was")
    }

    @Test("declared queues are found a few SCAN pages per call over a large keyspace: each call bounded, a full pass finds them all, a removed binding leaves with the next pass")
    func declaredQueuesIncrementally() async throws {
        let c = broker.client
        // 5,000 other keys (as the Redis result backend's celery-task-meta-* would be), and kombu's bindings
        for chunk in stride(from: 0, to: 5_000, by: 500) {
            _ = try await c.pipeline((chunk..<chunk + 500).map { ["SET", "celery-task-meta-\($0)", "x"] })
        }
        _ = try await c.send(["SADD", "_kombu.binding.default", "default\u{06}\u{16}\u{06}\u{16}default"])
        _ = try await c.send(["SADD", "_kombu.binding.gpu", "gpu\u{06}\u{16}\u{06}\u{16}gpu"])
        _ = try await c.send(["SADD", "_kombu.binding.reply.celery.pidbox", "x\u{06}\u{16}\u{06}\u{16}y"])
        func scans() async throws -> Int {
            let info = try await c.send(["INFO", "commandstats"]).string ?? ""
            let line = info.split(whereSeparator: \.isNewline).first { $0.hasPrefix("cmdstat_scan:") } ?? ""
            return Int(line.split(separator: ",").first?.split(separator: "=").last ?? "0") ?? 0
        }
        let i = BrokerInspector(client: c)
        var scan = DeclaredQueueScan()
        var calls = 0
        var found: [String] = []
        while scan.passes == 0 && calls < 100 {
            let before = try await scans()
            found = try await i.declaredQueues(continuing: &scan, pages: 2, count: 100)
            #expect(try await scans() - before <= 2, "a call issues at most `pages` SCANs")
            calls += 1
        }
        #expect(found == ["default", "gpu"], "the whole pass: every binding but Celery's pidbox")
        #expect(calls > 10, "5,000 keys at 200 per call take many calls (\(calls)), none of them long")
        #expect(try await i.declaredQueues() == ["default", "gpu"], "the one-shot form agrees")
        // a binding gone (its queue deleted) stays until the next pass completes without it
        _ = try await c.send(["DEL", "_kombu.binding.gpu"])
        let passes = scan.passes
        while scan.passes == passes { found = try await i.declaredQueues(continuing: &scan, pages: 2, count: 100) }
        #expect(found == ["default"])
    }

    @Test("heartbeat records the worker on Redis's clock and the inspector reads it back")
    func heartbeat() async throws {
        let s = WorkerStatus(
            workerID: "east@h:1", datacenter: "east", slots: 8, busy: 3, queues: ["default", "reports"], hostname: "h",
            pid: 1, runningJobs: ["1", "2", "3"], aheadJobs: ["4"], state: .running)
        let now = try await broker.heartbeat(s, ttlSeconds: 60)
        let ws = try await BrokerInspector(client: broker.client).workers()
        #expect(ws.count == 1)
        #expect(ws[0].lastSeenMs == now)
        #expect(ws[0].runningJobs == ["1", "2", "3"] && ws[0].aheadJobs == ["4"])
        #expect(ws[0].busy == 3 && ws[0].slots == 8 && ws[0].queues == ["default", "reports"])
        let dcs = try await BrokerInspector(client: broker.client).datacenters(lossAfterMs: 15000, known: ["west"])
        #expect(dcs.map(\.name) == ["east", "west"])
        #expect(dcs[0].status == .alive)
        #expect(dcs[1].status == .lost)
    }

    @Test("the Redis result backend never overwrites SUCCESS, publishes, and refuses a stale token")
    func storeResult() async throws {
        let config = try RedisConfiguration(url: server.url)
        let results = RedisResultBackend(configuration: config, sameServerAsBroker: true, logger: Logger(label: "t"))
        _ = try await publish()
        _ = try await broker.dispatch(queue: "default", to: "east", max: 1, epoch: nil)
        let j = try #require(try await broker.claim(workerID: "w", datacenter: "east", queues: ["default"], max: 1, leaseMs: 10000).first)
        let fence = Fence(jobID: j.jobID, token: j.token)
        let stale = Fence(jobID: j.jobID, token: j.token - 1)
        #expect(try await results.store(.success(taskId: "t1"), fence: stale) == .fenced)
        #expect(try await results.state(taskID: "t1") == .pending)
        #expect(try await results.store(.started(taskId: "t1", pid: 5, hostname: "h"), fence: fence) == .written)
        #expect(try await results.state(taskID: "t1") == .started)
        #expect(try await results.store(.success(taskId: "t1"), fence: fence) == .written)
        let ttl = try await broker.client.send(["TTL", "celery-task-meta-t1"]).int ?? 0
        #expect(ttl > 86000)
        #expect(try await results.store(ResultRecord(taskId: "t1", state: .failure), fence: fence) == .keptSuccess)
        #expect(try await results.state(taskID: "t1") == .success)
    }
}
