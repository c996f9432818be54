import ArgumentParser
import Foundation
import TandemCore
import TandemRedis

/// The move from stock Celery: messages a Celery worker reserved and never acked (kombu's `unacked` hash — a worker
/// that was killed or stopped cold) go back to their Airflow lists as kombu's own restore would put them, so
/// Tandem's dispatcher takes them (Protocol/SPEC.md, decision 28).
struct AdoptCmd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "adopt",
        abstract: "Moving from stock Celery: restore messages a Celery worker reserved and never acked, so Tandem runs them.",
        discussion: """
            A Celery worker holds the messages it reserved in kombu's `unacked` hash until it acks them; one that was
            killed (or stopped cold) leaves them there, and only another Celery worker restores them, after
            visibility_timeout (Airflow sets 24 h). Tandem reads Airflow's lists only, so after a move to Tandem they
            would wait for good. This shows them and restores, exactly as kombu does (to the queue the exchange's
            binding names, marked redelivered), those reserved longer ago than --visibility-timeout — or all of them
            with --all, once no stock Celery worker runs any more (a live one may still be running what it holds).
            """)
    @OptionGroup var common: Common
    @Option(name: .customLong("visibility-timeout"), help: "Seconds after which a reservation counts as abandoned, as kombu's own restore judges it (default 86400, what Airflow sets).")
    var visibilityTimeout: Double = 86400
    @Flag(help: "Restore every reserved message, however recent: only once no stock Celery worker runs any more.")
    var all = false
    @Flag(name: .customLong("dry-run"), help: "Show what would be restored; change nothing.") var dryRun = false
    @Flag(help: "Do not ask for confirmation.") var yes = false

    func run() async throws {
        try await common.withInspector { i in
            let reserved = try await i.celeryReserved(limit: 100_000)
            let limitMs = Int64(visibilityTimeout * 1000)
            func due(_ r: CeleryReserved) -> Bool { all || (r.ageMs ?? 0) >= limitMs }
            let chosen = reserved.filter { due($0) && !$0.lists.isEmpty }
            var outcomes: [String: AdoptOutcome] = [:]
            if !chosen.isEmpty && !dryRun {
                if !yes && !confirm("restore \(chosen.count) message(s) Celery workers reserved to Airflow's lists? Tandem will run them (again, if a Celery worker had started one)") {
                    fail("not confirmed; nothing changed", code: Exit.notFound)
                }
                // kombu restores newest first onto the consuming end, so the oldest is next in line: the same here
                for r in chosen.reversed() { outcomes[r.deliveryTag] = try await i.adopt(r) }
            }
            func what(_ r: CeleryReserved) -> String {
                if r.lists.isEmpty { return "left: no binding routes it to a queue (not kombu's shape, or its queue was deleted)" }
                switch outcomes[r.deliveryTag] {
                case .restored(let lists)?: return "restored to " + lists.map(printableList).joined(separator: ", ")
                case .gone?: return "left: a Celery worker acked or restored it meanwhile"
                case .mutexHeld?: return "left: a Celery worker is restoring now (kombu's unacked_mutex): run again in a minute"
                case .unroutable?: return "left: no binding routes it"
                case nil:
                    if dryRun && due(r) { return "would restore to " + r.lists.map(printableList).joined(separator: ", ") }
                    return "left: reserved \(seconds(r.ageMs ?? 0)) ago, under --visibility-timeout; a Celery worker may still run it (--all once none does)"
                }
            }
            if common.json {
                printJSON(reserved.map { r -> [String: Any] in
                    var o: [String: Any] = ["delivery_tag": r.deliveryTag, "task_id": r.taskID, "lists": r.lists, "outcome": what(r)]
                    if let age = r.ageMs { o["reserved_ms_ago"] = age }
                    if let t = r.airflowTarget { o["airflow_task"] = t }
                    if case .restored? = outcomes[r.deliveryTag] { o["restored"] = true } else { o["restored"] = false }
                    return o
                })
                return
            }
            if reserved.isEmpty {
                print("no message is reserved by a stock Celery worker (kombu's unacked hash is empty): nothing to adopt")
                return
            }
            printTable(["TASK ID", "AIRFLOW TASK", "RESERVED", "WHAT"], reserved.map { r in
                [r.taskID, r.airflowTarget ?? "-", r.ageMs.map { seconds($0) + " ago" } ?? "?", what(r)]
            }) { row, col, _ in
                col == 3 && { if case .restored? = outcomes[reserved[row].deliveryTag] { return false } else { return true } }() ? Style.yellow : nil
            }
            let restored = outcomes.values.filter { if case .restored = $0 { return true } else { return false } }.count
            if dryRun { print("dry run: nothing changed") } else {
                print("\(restored) of \(reserved.count) restored to Airflow's lists: the dispatcher routes them like any new task")
            }
        }
    }
}
