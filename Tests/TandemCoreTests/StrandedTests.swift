import TandemCore
import Testing

@Suite("Stranded work: what waits in Airflow's lists that nothing can take")
struct StrandedTests {
    func worker(_ id: String, _ dc: String, _ queues: [String], _ state: WorkerStatus.State = .running) -> WorkerStatus {
        WorkerStatus(workerID: id, datacenter: dc, slots: 4, busy: 4, queues: queues, hostname: "h", pid: 1, runningJobs: [], state: state)
    }

    @Test("a queue no worker serves, one served only in a lost datacenter, one only by stopping workers")
    func unserved() {
        let workers = [worker("w1", "west", ["default"]), worker("e1", "east", ["gpu"]), worker("w2", "west", ["etl"], .draining)]
        let found = StrandedQueue.find(
            waiting: ["default": 5, "gpu": 2, "reports": 3, "etl": 1, "empty": 0], workers: workers, live: ["west"], policy: nil)
        #expect(found.map(\.queue) == ["etl", "gpu", "reports"])
        #expect(found.map(\.waiting) == [1, 2, 3])
        #expect(found[1].reason.contains("served only in east"))
        #expect(found[2].reason.contains("no live worker serves queue 'reports'"))
        #expect(found[2].reason.contains("--queues reports"))
        #expect(found[0].reason.contains("served only in west"))
    }

    @Test("busy slots are not stranding: a backlog on a served queue is left to drain")
    func backlogIsNotStranded() {
        let found = StrandedQueue.find(waiting: ["default": 10_000], workers: [worker("w1", "west", ["default"])], live: ["west"], policy: nil)
        #expect(found.isEmpty)
    }

    @Test("the policy's view: pinned to a lost datacenter, or to one where nobody serves the queue")
    func policy() throws {
        let policy = try RoutingPolicy.parse(yaml: """
            queues:
              reports: {pin: east}
              audit: {spread: [east]}
              default: {pin: east, fallback: west}
            """)
        let workers = [worker("w1", "west", ["reports", "audit", "default"]), worker("e1", "east", ["default"])]
        // east alive: reports and audit may go only to east, where nobody serves them
        let alive = StrandedQueue.find(waiting: ["reports": 1, "audit": 1, "default": 1], workers: workers, live: ["east", "west"], policy: policy)
        #expect(alive.map(\.queue) == ["audit", "reports"])
        #expect(alive[1].reason.contains("sends queue 'reports' to east, where no live worker serves it (it is served in west)"))
        // east lost: the pin waits (no fallback), the fallback takes default to west
        let lost = StrandedQueue.find(waiting: ["reports": 1, "default": 1], workers: workers, live: ["west"], policy: policy)
        #expect(lost.map(\.queue) == ["reports"])
        #expect(lost[0].reason.contains("only to east, and none of those datacenters takes work now"))
        // without the policy the same view strands nothing: west serves both
        #expect(StrandedQueue.find(waiting: ["reports": 1, "default": 1], workers: workers, live: ["west"], policy: nil).isEmpty)
    }
}
