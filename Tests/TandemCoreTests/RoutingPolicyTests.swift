import TandemCore
import Testing

@Suite("Routing policy")
struct RoutingPolicyTests {
    let yaml = """
        queues:
          default: {spread: [east, west]}
          reports: {pin: east, fallback: west}
          audit:   {pin: west}
        """

    @Test("parses spread, pin and pin-with-fallback")
    func parses() throws {
        let p = try RoutingPolicy.parse(yaml: yaml)
        #expect(p.rule(for: "default") == .spread(["east", "west"]))
        #expect(p.rule(for: "reports") == .pin("east", fallback: "west"))
        #expect(p.rule(for: "audit") == .pin("west", fallback: nil))
        #expect(p.rule(for: "unnamed") == .spread(nil))
        #expect(p.namedQueues == ["audit", "default", "reports"])
    }

    @Test("an empty file means: spread every queue across live datacenters")
    func emptyFile() throws {
        #expect(try RoutingPolicy.parse(yaml: "") == RoutingPolicy())
    }

    @Test("eligible datacenters follow liveness: spread skips the lost, pin waits, fallback takes over and hands back")
    func eligibility() throws {
        let p = try RoutingPolicy.parse(yaml: yaml)
        #expect(p.eligibleDatacenters(for: "default", live: ["east", "west"]) == ["east", "west"])
        #expect(p.eligibleDatacenters(for: "default", live: ["west"]) == ["west"])
        #expect(p.eligibleDatacenters(for: "reports", live: ["east", "west"]) == ["east"])
        #expect(p.eligibleDatacenters(for: "reports", live: ["west"]) == ["west"])
        #expect(p.eligibleDatacenters(for: "reports", live: []) == [])
        #expect(p.eligibleDatacenters(for: "audit", live: ["east"]) == [])
        #expect(p.eligibleDatacenters(for: "other", live: ["north", "east"]) == ["east", "north"])
    }

    @Test("bad policies are refused with a message that names the queue and the fix", arguments: [
        ("queues: [a, b]", "'queues' must map"),
        ("queues: {default: {spread: []}}", "non-empty list"),
        ("queues: {default: {pin: east, spread: [west]}}", "both spread and pin"),
        ("queues: {default: {pin: 'ea:st'}}", "may contain only"),
        ("queues: {default: {pin: east, fallback: east}}", "falls back to its own pin"),
        ("queues: {default: {pinned: east}}", "unknown key 'pinned'"),
        ("routes: {}", "unknown top-level key 'routes'"),
        ("queues: {default: [", "not valid YAML"),
    ])
    func refusesBadPolicies(text: String, expected: String) {
        #expect {
            _ = try RoutingPolicy.parse(yaml: text)
        } throws: { error in
            "\(error)".contains(expected)
        }
    }

    typealias Room = RoutingPolicy.Room

    @Test("placement fills idle slots first, most idle first, then prefetch room; never more than the room; none without room")
    func placement() {
        // east's 8 slots are all taken, west has 8 idle: every job goes west, none waits behind east's busy slots
        let busyEast = RoutingPolicy.place(
            available: 5, eligible: ["east", "west"], room: ["east": Room(idleSlots: 0, prefetch: 8), "west": Room(idleSlots: 8, prefetch: 8)])
        #expect(busyEast.map(\.0) == ["west"] && busyEast.map(\.1) == [5])
        // one job at a time goes to the datacenter with the most idle slots, whichever comes first in the list
        let one = RoutingPolicy.place(
            available: 1, eligible: ["east", "west"], room: ["east": Room(idleSlots: 2, prefetch: 8), "west": Room(idleSlots: 3, prefetch: 8)])
        #expect(one.map(\.0) == ["west"])
        // idle slots spread evenly, then the prefetch room, then nothing more
        let many = RoutingPolicy.place(
            available: 100, eligible: ["east", "west"], room: ["east": Room(idleSlots: 4, prefetch: 2), "west": Room(idleSlots: 2, prefetch: 6)])
        #expect(Dictionary(uniqueKeysWithValues: many) == ["east": 6, "west": 8])
        let even = RoutingPolicy.place(
            available: 4, eligible: ["east", "west"], room: ["east": Room(idleSlots: 8, prefetch: 0), "west": Room(idleSlots: 8, prefetch: 0)])
        #expect(Dictionary(uniqueKeysWithValues: even) == ["east": 2, "west": 2])
        // idle slots win over prefetch room even when the prefetch room is larger elsewhere
        let idleFirst = RoutingPolicy.place(
            available: 3, eligible: ["east", "west"], room: ["east": Room(idleSlots: 0, prefetch: 50), "west": Room(idleSlots: 3, prefetch: 0)])
        #expect(idleFirst.map(\.0) == ["west"] && idleFirst.map(\.1) == [3])
        #expect(RoutingPolicy.place(available: 5, eligible: ["east"], room: ["east": Room(idleSlots: 0, prefetch: 0)]).isEmpty)
        #expect(RoutingPolicy.place(available: 5, eligible: ["east"], room: ["east": Room(idleSlots: -2, prefetch: -3)]).isEmpty)
        #expect(RoutingPolicy.place(available: 0, eligible: ["east"], room: ["east": Room(idleSlots: 3, prefetch: 3)]).isEmpty)
        #expect(RoutingPolicy.place(available: 5, eligible: [], room: [:]).isEmpty)
        #expect(RoutingPolicy.place(available: 5, eligible: ["east"], room: [:]).isEmpty)
    }
}

@Suite("Datacenter health")
struct DatacenterHealthTests {
    func worker(_ id: String, _ dc: String, seen: Int64, state: WorkerStatus.State = .running, busy: Int = 0) -> WorkerStatus {
        WorkerStatus(workerID: id, datacenter: dc, slots: 4, busy: busy, queues: ["default"], hostname: "h", pid: 1,
            runningJobs: [], state: state, lastSeenMs: seen)
    }

    @Test("alive while any worker heartbeats; lost after the threshold of silence; overrides win")
    func evaluate() {
        let now: Int64 = 100_000
        let ws = [worker("e1", "east", seen: now - 20_000), worker("e2", "east", seen: now - 1_000, busy: 2),
            worker("w1", "west", seen: now - 16_000)]
        var s = DatacenterHealth.evaluate(known: ["north"], workers: ws, overrides: [:], nowMs: now, lossAfterMs: 15_000)
        #expect(s.map(\.name) == ["east", "north", "west"])
        #expect(s[0].status == .alive && s[0].liveWorkers == 1 && s[0].busy == 2 && s[0].slots == 4)
        #expect(s[1].status == .lost && s[1].reason == "no worker has ever heartbeated")
        #expect(s[2].status == .lost && s[2].reason.contains("no heartbeat for 16 s"))
        s = DatacenterHealth.evaluate(known: [], workers: ws, overrides: ["east": .fail], nowMs: now, lossAfterMs: 15_000)
        #expect(s[0].status == .lost && s[0].reason.contains("declared lost"))
        s = DatacenterHealth.evaluate(known: [], workers: ws, overrides: ["east": .drain], nowMs: now, lossAfterMs: 15_000)
        #expect(s[0].status == .draining && !s[0].acceptsWork)
    }

    @Test("a datacenter whose workers are all shutting down is draining; stopped workers do not count")
    func shuttingDown() {
        let now: Int64 = 50_000
        let s = DatacenterHealth.evaluate(
            known: [], workers: [worker("e1", "east", seen: now, state: .draining), worker("w1", "west", seen: now, state: .stopped)],
            overrides: [:], nowMs: now, lossAfterMs: 15_000)
        #expect(s[0].status == .draining)
        #expect(s[1].status == .lost)
    }

    @Test("datacenter names that cannot live in a Redis key are refused")
    func names() {
        #expect(Names.problem(datacenter: "east-1_b") == nil)
        #expect(Names.problem(datacenter: "") != nil)
        #expect(Names.problem(datacenter: "a:b") != nil)
        #expect(Names.problem(datacenter: "a b") != nil)
    }
}
