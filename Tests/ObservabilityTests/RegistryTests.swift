import Foundation
import Logging
import Observability
import TandemCore
import Testing

@Suite("Prometheus registry and text format")
struct RegistryTests {
    @Test("counters, gauges and histograms render in text format 0.0.4 with HELP, TYPE and cumulative buckets")
    func rendersTextFormat() {
        let r = MetricsRegistry()
        let c = r.counter("t_total", help: "Things.", labels: ["dc", "queue"])
        c.inc(["east", "default"])
        c.inc(["east", "default"], by: 2)
        c.inc(["west", "default"])
        let g = r.gauge("t_depth", help: "Depth.")
        g.set(7)
        let h = r.histogram("t_seconds", help: "Time.", labels: ["dc"], buckets: [1, 5])
        h.observe(["east"], 0.5)
        h.observe(["east"], 3)
        h.observe(["east"], 10)
        let text = r.render()
        #expect(text.contains("# HELP t_total Things.\n# TYPE t_total counter\n"))
        #expect(sample(text, "t_total", ["dc": "east", "queue": "default"]) == 3)
        #expect(sample(text, "t_total", ["dc": "west", "queue": "default"]) == 1)
        #expect(sample(text, "t_depth") == 7)
        #expect(text.contains("# TYPE t_seconds histogram"))
        #expect(sample(text, "t_seconds_bucket", ["dc": "east", "le": "1"]) == 1)
        #expect(sample(text, "t_seconds_bucket", ["dc": "east", "le": "5"]) == 2)
        #expect(sample(text, "t_seconds_bucket", ["dc": "east", "le": "+Inf"]) == 3)
        #expect(sample(text, "t_seconds_sum", ["dc": "east"]) == 13.5)
        #expect(sample(text, "t_seconds_count", ["dc": "east"]) == 3)
        #expect(text.hasSuffix("\n"))
    }

    @Test("label values are escaped; a family stops growing at maxSeries and counts what it dropped")
    func escapingAndBounds() {
        let r = MetricsRegistry()
        let c = r.counter("odd_total", help: "Odd.", labels: ["queue"])
        c.inc(["a\"b\\c\nd"])
        #expect(r.render().contains(#"odd_total{queue="a\"b\\c\nd"} 1"#))
        for i in 0..<(MetricsRegistry.maxSeries + 5) { c.inc(["q\(i)"]) }
        let text = r.render()
        #expect(text.split(separator: "\n").filter { $0.hasPrefix("odd_total{") }.count == MetricsRegistry.maxSeries)
        #expect(sample(text, "tandem_metrics_dropped_series_total") == 6)
    }

    @Test("a gauge snapshot replaces the previous one: a queue that vanished disappears")
    func gaugeReplace() {
        let r = MetricsRegistry()
        let g = r.gauge("depth", help: "D.", labels: ["queue"])
        g.replace([["a"]: 1, ["b"]: 2])
        g.replace([["b"]: 3])
        let text = r.render()
        #expect(sample(text, "depth", ["queue": "a"]) == nil)
        #expect(sample(text, "depth", ["queue": "b"]) == 3)
    }

    @Test("broker health: an error streak is not ready until a success, or until the window passes without errors")
    func brokerHealth() {
        let clock = Clock()
        let h = BrokerHealth(window: 10, now: { clock.now })
        #expect(h.problem() == nil)
        h.error()
        clock.now += 1
        #expect(h.problem()?.contains("Redis unreachable: 1 failed") == true)
        h.success()
        #expect(h.problem() == nil)
        h.error()
        h.error()
        #expect(h.problem()?.contains("2 failed") == true)
        clock.now += 11
        #expect(h.problem() == nil)
    }

    @Test("dispatcher observer: datacenter status, losses on alive → lost, queue gauges, leader epoch")
    func dispatcherObserver() {
        let o = PrometheusDispatcherObserver()
        o.datacenters([makeState("east", .alive), makeState("west", .alive)])
        o.datacenters([makeState("east", .lost), makeState("west", .alive)])
        o.datacenters([makeState("east", .lost), makeState("west", .alive)])
        o.queues([.init(datacenter: "west", queue: "default", depth: 4, inFlight: 2, oldestAgeMs: 1500)])
        o.leadership(epoch: 7)
        o.dispatched(queue: "default", datacenter: "west", count: 3)
        o.reclaimed(requeued: 2, dead: 1)
        o.rebalanced(queue: "default", from: "east", to: "west", count: 5)
        let t = o.registry.render()
        #expect(sample(t, "tandem_datacenter_status", ["dc": "east", "status": "lost"]) == 1)
        #expect(sample(t, "tandem_datacenter_status", ["dc": "east", "status": "alive"]) == 0)
        #expect(sample(t, "tandem_datacenter_losses_total", ["dc": "east"]) == 1)
        #expect(sample(t, "tandem_datacenter_losses_total", ["dc": "west"]) == 0)
        #expect(sample(t, "tandem_queue_depth", ["dc": "west", "queue": "default"]) == 4)
        #expect(sample(t, "tandem_queue_in_flight", ["dc": "west", "queue": "default"]) == 2)
        #expect(sample(t, "tandem_queue_oldest_age_seconds", ["dc": "west", "queue": "default"]) == 1.5)
        #expect(sample(t, "tandem_leader_epoch") == 7)
        #expect(sample(t, "tandem_dispatcher_leader") == 1)
        #expect(sample(t, "tandem_dispatched_total", ["queue": "default", "dc": "west"]) == 3)
        #expect(sample(t, "tandem_reclaimed_total", ["disposition": "requeued"]) == 2)
        #expect(sample(t, "tandem_reclaimed_total", ["disposition": "dead"]) == 1)
        #expect(sample(t, "tandem_rebalanced_total", ["queue": "default", "from": "east", "to": "west"]) == 5)
    }
}

/// A datacenter state as the dispatcher computes it (DatacenterState has no public memberwise init).
func makeState(_ name: String, _ status: DatacenterState.Status) -> DatacenterState {
    let now: Int64 = 1_000_000
    let worker = WorkerStatus(
        workerID: "\(name)-1", datacenter: name, slots: 4, busy: 1, queues: ["default"], hostname: "h", pid: 1,
        runningJobs: [], state: .running, lastSeenMs: now)
    let overrides: [String: DatacenterOverride] = status == .lost ? [name: .fail] : status == .draining ? [name: .drain] : [:]
    return DatacenterHealth.evaluate(known: [name], workers: [worker], overrides: overrides, nowMs: now, lossAfterMs: 15_000)[0]
}

final class Clock: @unchecked Sendable {
    var now: Double = 1000
}

@Suite("Dispatcher observer leadership")
struct LeadershipTests {
    @Test("a standby reports leader 0; when deposed, its stale queue and datacenter gauges disappear")
    func standbyAndDeposed() {
        let o = PrometheusDispatcherObserver()
        #expect(sample(o.registry.render(), "tandem_dispatcher_leader") == 0)
        o.leadership(epoch: 3)
        o.datacenters([makeState("east", .alive)])
        o.queues([.init(datacenter: "east", queue: "default", depth: 1, inFlight: 0, oldestAgeMs: 10)])
        #expect(sample(o.registry.render(), "tandem_queue_depth", ["dc": "east", "queue": "default"]) == 1)
        o.leadership(epoch: nil)
        let t = o.registry.render()
        #expect(sample(t, "tandem_dispatcher_leader") == 0)
        #expect(sample(t, "tandem_leader_epoch") == 0)
        #expect(sample(t, "tandem_queue_depth", ["dc": "east", "queue": "default"]) == nil)
        #expect(sample(t, "tandem_datacenter_status", ["dc": "east", "status": "alive"]) == nil)
    }
}
