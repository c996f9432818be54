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

    @Test("split follows headroom, never hands out more than there is room for, and waits when there is none")
    func split() {
        let s = RoutingPolicy.split(available: 100, eligible: ["east", "west"], headroom: ["east": 30, "west": 10])
        #expect(s.map(\.0) == ["east", "west"])
        #expect(s.map(\.1).reduce(0, +) == 40)
        #expect(s[0].1 == 30 && s[1].1 == 10)
        let few = RoutingPolicy.split(available: 4, eligible: ["east", "west"], headroom: ["east": 8, "west": 8])
        #expect(few.map(\.1).reduce(0, +) == 4)
        #expect(few.allSatisfy { $0.1 >= 1 })
        #expect(RoutingPolicy.split(available: 5, eligible: ["east"], headroom: ["east": 0]).isEmpty)
        #expect(RoutingPolicy.split(available: 5, eligible: ["east"], headroom: ["east": -3]).isEmpty)
        #expect(RoutingPolicy.split(available: 0, eligible: ["east"], headroom: ["east": 3]).isEmpty)
        #expect(RoutingPolicy.split(available: 5, eligible: [], headroom: [:]).isEmpty)
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
