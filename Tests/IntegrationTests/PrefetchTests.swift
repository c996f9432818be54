@testable import Dispatcher
import Foundation
import Logging
import Redis
import TandemCore
import TandemRedis
import Testing

/// How much a datacenter queue may hold beyond its idle slots: what its workers claim in the prefetch window, at
/// most the limit (Protocol/SPEC.md § 8). Rates are made far from the thresholds so timing cannot move the answer.
@Suite("Prefetch sizing")
struct PrefetchTests {
    func dispatcher(window: Duration = .milliseconds(20), limit: Int = 4) throws -> DispatcherRuntime {
        var c = DispatcherConfiguration(policy: RoutingPolicy(), queues: ["default"])
        c.prefetchWindow = window
        c.prefetchFactor = limit
        // never connected: sizing reads only the claim counts it is given
        let broker = RedisBroker(configuration: try RedisConfiguration(url: "redis://127.0.0.1:1/0"), logger: Logger(label: "t"))
        return DispatcherRuntime(configuration: c, broker: broker, logger: Logger(label: "t"))
    }

    @Test("no claims yet, or slow claims: no prefetch; fast claims: up to the limit; a restarted worker keeps the rate")
    func sizing() async throws {
        let d = try dispatcher()
        let slots = ["east": 8, "west": 8]
        // the first look has no rate yet
        #expect(d.prefetchPerSlot(claimedByDC: ["east": 0, "west": 0], slotsByDC: slots) == ["east": 0, "west": 0])
        try await Task.sleep(for: .milliseconds(300))
        // east claimed a million in ~0.3 s (capped at 4 × slots); west one (≈ 3/s × 20 ms: nothing)
        let p = d.prefetchPerSlot(claimedByDC: ["east": 1_000_000, "west": 1], slotsByDC: slots)
        #expect(p["east"] == 4)
        #expect(p["west"] == 0)
        // east's counts went down (a worker restarted and counts from zero): its last rate stands
        #expect(d.prefetchPerSlot(claimedByDC: ["east": 10, "west": 1], slotsByDC: slots)["east"] == 4)
    }

    @Test("a window of 0 turns prefetch off however fast the claims")
    func windowZero() async throws {
        let d = try dispatcher(window: .zero)
        _ = d.prefetchPerSlot(claimedByDC: ["east": 0], slotsByDC: ["east": 8])
        try await Task.sleep(for: .milliseconds(300))
        #expect(d.prefetchPerSlot(claimedByDC: ["east": 1_000_000], slotsByDC: ["east": 8])["east"] == 0)
    }
}
