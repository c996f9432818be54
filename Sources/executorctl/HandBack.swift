import ArgumentParser
import Foundation
import TandemCore
import TandemRedis

/// The way back to stock Celery: every message Tandem holds that no live worker is running goes back to Airflow's
/// list it came from, byte for byte, where `airflow celery worker` takes it (Protocol/SPEC.md, decision 27).
struct HandBackCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "handback",
        abstract: "Roll back to stock Celery workers: give queued work back to Airflow's lists, unchanged.",
        discussion: """
            Stop every swift-dispatcher (it would move the work straight back) and every swift-worker (SIGTERM;
            with --shutdown-grace forever their running tasks finish) first. Then this moves, per queue, the
            message a dispatcher parked, every job queued in a datacenter queue and every job whose lease ran out
            (its worker is gone) back to Airflow's list, oldest next in line, and says what stays: jobs a live
            lease holds (they finish under Tandem) and dead letters (executorctl dlq replay first to include them).
            Then start `airflow celery worker`. Safe to run again; each message moves in one atomic step.
            """)
    @OptionGroup var common: Common
    @Option(help: "Comma-separated Airflow queues to hand back (default: every queue).") var queues: String?
    @Option(name: .customLong("dc-loss-after"), help: "Seconds without a heartbeat after which a worker counts as gone.")
    var lossAfter: Double = 15
    @Flag(help: "Hand back even while a dispatcher leads or workers run (a leading dispatcher moves the work straight back).")
    var force = false
    @Flag(help: "Do not ask for confirmation.") var yes = false

    func validate() throws {
        if let problem = DatacenterHealth.lossAfterProblem(lossAfter) { throw ValidationError(problem) }
    }

    func run() async throws {
        let only = queues.map { Set($0.split(separator: ",").map(String.init)) }
        try await common.withInspector { i in
            if !force {
                if let lead = try await i.leaderLease(), lead.isLive {
                    fail("dispatcher \(lead.owner) leads (lease for \(seconds(lead.deadlineMs - lead.nowMs)) more): it would move the work straight back into datacenter queues. Stop every swift-dispatcher first (its lease then lapses), or pass --force", code: Exit.notFound)
                }
                let running = try await i.workers(withinMs: Int64(lossAfter * 1000)).filter { w in
                    w.state != .stopped && (only.map { !$0.isDisjoint(with: w.queues) } ?? true)
                }
                if !running.isEmpty {
                    fail("workers still run: \(running.map(\.workerID).sorted().joined(separator: ", ")) (executorctl workers). Stop them first — SIGTERM lets running tasks finish (--shutdown-grace forever waits for all of them) — or pass --force to hand back only what they have not claimed", code: Exit.notFound)
                }
            }
            if !yes && !confirm("hand back every unclaimed message\(queues.map { " of \($0)" } ?? "") to Airflow's lists? stock Celery workers will run them") {
                fail("not confirmed; nothing changed", code: Exit.notFound)
            }
            let done = try await i.handBack(queues: only)
            let deadLetters = try await i.deadLetters(limit: 1_000_000).count
            if common.json {
                printJSON([
                    "handed_back": done.moved.mapValues { ["queued": $0.queued, "staged": $0.staged, "expired_leases": $0.expiredLeases] },
                    "total": done.total,
                    "still_leased": done.stillLeased.map { ["job": $0.jobID, "owner": $0.owner, "datacenter": $0.datacenter, "queue": $0.queue, "remaining_ms": $0.remainingMs] as [String: Any] },
                    "dropped": done.dropped, "dead_letters": deadLetters,
                ] as [String: Any])
                return
            }
            let rows = done.moved.filter { $0.value.total > 0 }.sorted { $0.key < $1.key }
            if rows.isEmpty {
                print("nothing to hand back: no queued, parked or orphaned work\(queues.map { " for \($0)" } ?? "")")
            } else {
                printTable(["QUEUE", "QUEUED", "PARKED", "LEASE RAN OUT", "HANDED BACK"], rows.map { q, c in
                    [q, String(c.queued), String(c.staged), String(c.expiredLeases), String(c.total)]
                })
                print("\(done.total) message(s) are back in Airflow's lists, unchanged: start stock workers (airflow celery worker --queues \(rows.map(\.key).joined(separator: ","))) to run them")
            }
            if !done.stillLeased.isEmpty {
                // a worker killed with -9 still holds its leases until they run out, and no dispatcher reclaims them
                let heard = Set(try await i.workers(withinMs: Int64(lossAfter * 1000)).filter { $0.state != .stopped }.map(\.workerID))
                let running = done.stillLeased.filter { heard.contains($0.owner) }
                let orphaned = done.stillLeased.filter { !heard.contains($0.owner) }
                if !running.isEmpty {
                    print("\(running.count) job(s) stay leased to \(Set(running.map(\.owner)).sorted().joined(separator: ", ")), which still run: they finish under Tandem and write their results as usual; if such a worker dies first, run executorctl handback again once its lease runs out")
                }
                if !orphaned.isEmpty {
                    let wait = seconds(orphaned.map(\.remainingMs).max() ?? 0)
                    print("\(orphaned.count) job(s) are leased to \(Set(orphaned.map(\.owner)).sorted().joined(separator: ", ")), which no longer heartbeat(s): nothing runs them now; their leases run out within \(wait) — run executorctl handback again then")
                }
            }
            if done.dropped > 0 { print("\(done.dropped) queue entr(ies) had no job left (already gone); removed") }
            if deadLetters > 0 {
                print("\(deadLetters) dead letter(s) stay in Tandem's dead-letter queue (executorctl dlq list): replay one (executorctl dlq replay ID) and run handback again to give it to Celery too")
            }
        }
    }
}
