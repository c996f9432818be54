#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import Foundation
import Setup
import TandemCore
import TandemRedis

/// A live view, like top: datacenters, queues, Airflow's lists, workers, leases and dead letters, redrawn in
/// place on a terminal (one frame after another otherwise). q or Ctrl-C quits.
struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live view of datacenters, queues, workers, leases and dead letters (q or Ctrl-C quits).",
        discussion: """
            On a terminal the view is redrawn in place; otherwise (a pipe, a file) each frame is printed after the
            last, and --json prints one JSON object per frame and line. Redis going away is shown in the view and
            retried; only the first connection failing exits (2).
            """)
    @OptionGroup var common: Common
    @Option(help: "Seconds between refreshes (default 2).") var interval: Double = 2
    @Option(name: .customLong("dc-loss-after"), help: "Loss threshold in seconds, as the dispatcher's (default 15).")
    var lossAfter: Double = 15
    @Option(help: "Comma-separated Airflow queues whose lists to show besides 'default', every declared queue and those workers serve.") var queues = ""
    @Option(help: "Stop after this many frames (default: until q or Ctrl-C).") var count: Int?

    func validate() throws {
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1 seconds") }
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
        if let problem = DatacenterHealth.lossAfterProblem(lossAfter) { throw ValidationError(problem) }
    }

    func run() async throws {
        let i = try await common.inspector()
        let tty = isatty(1) != 0 && !common.json
        let keys = isatty(0) != 0 ? RawKeys() : nil
        let cleanup: @Sendable () -> Void = {
            keys?.restore()
            if tty { print("\u{1B}[?25h", terminator: "") }
            fflush(nil)
        }
        signal(SIGINT, SIG_IGN)
        let sigint = DispatchSource.makeSignalSource(signal: SIGINT, queue: .main)
        sigint.setEventHandler {
            cleanup()
            if tty { print("") }
            Foundation.exit(0)
        }
        sigint.resume()
        defer {
            sigint.cancel()
            cleanup()
        }
        if tty { print("\u{1B}[?25l\u{1B}[2J", terminator: "") }
        var frames = 0
        // declared queues a few SCAN pages per frame (a large keyspace must not cost every frame a full pass)
        var scan = DeclaredQueueScan()
        while true {
            let snapshot: Snapshot
            do {
                snapshot = try await Snapshot.take(i, lossAfterMs: Int64(lossAfter * 1000), queues: queues, scan: &scan)
            } catch {
                snapshot = Snapshot(error: "\(error)")
            }
            if common.json {
                printJSON(snapshot.json)
            } else {
                let lines = snapshot.render(url: common.brokerURL.redactingPassword, interval: interval, interactive: keys != nil)
                if tty {
                    // home, then each line over the last frame's, clearing what is left: no flicker
                    print("\u{1B}[H" + lines.map { $0 + "\u{1B}[K" }.joined(separator: "\n") + "\n\u{1B}[J", terminator: "")
                } else {
                    print(lines.joined(separator: "\n") + "\n")
                }
            }
            fflush(nil)
            frames += 1
            if let count, frames >= count { return }
            let end = Date().addingTimeInterval(interval)
            while Date() < end {
                if let k = keys?.poll(), k == UInt8(ascii: "q") || k == UInt8(ascii: "Q") { return }
                try? await Task.sleep(for: .milliseconds(50))
            }
        }
    }
}

/// The terminal in non-canonical, no-echo mode so single keys arrive at once; restored on exit.
final class RawKeys: @unchecked Sendable {
    private var saved = termios()
    private let lock = NSLock()
    private var restored = false

    init?() {
        guard tcgetattr(0, &saved) == 0 else { return nil }
        var raw = saved
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO)
        withUnsafeMutableBytes(of: &raw.c_cc) { cc in
            cc[Int(VMIN)] = 0
            cc[Int(VTIME)] = 0
        }
        tcsetattr(0, TCSANOW, &raw)
    }

    /// A key pressed since the last call, if any.
    func poll() -> UInt8? {
        var b: UInt8 = 0
        return read(0, &b, 1) == 1 ? b : nil
    }

    func restore() {
        lock.withLock {
            guard !restored else { return }
            restored = true
            tcsetattr(0, TCSANOW, &saved)
        }
    }

    deinit { restore() }
}

/// One look at the broker.
struct Snapshot {
    var at = Date()
    var error: String?
    var datacenters: [DatacenterState] = []
    var queues: [QueueStats] = []
    var ingress: [(list: String, depth: Int)] = []
    var airflow = AirflowLists()
    var workers: [WorkerStatus] = []
    var nowMs: Int64 = 0
    var leases = 0
    var expiredLeases = 0
    var deadLetters = 0
    var leader: LeaderLease?
    var memory: RedisMemory?
    var celeryReserved: (count: Int, oldestAgeMs: Int64?) = (0, nil)

    init(error: String) { self.error = error }
    private init() {}

    static func take(_ i: BrokerInspector, lossAfterMs: Int64, queues: String, scan: inout DeclaredQueueScan) async throws -> Snapshot {
        var s = Snapshot()
        s.nowMs = try await i.client.time().milliseconds
        s.datacenters = try await i.datacenters(lossAfterMs: lossAfterMs)
        s.queues = try await i.queueStats()
        s.workers = try await i.workers(withinMs: 3_600_000).sorted { ($0.datacenter, $0.workerID) < ($1.datacenter, $1.workerID) }
        // what can take work is judged as the datacenters are: by workers heard from within the loss window
        s.airflow = try await AirflowLists.read(
            i, workers: s.workers.filter { s.nowMs - $0.lastSeenMs <= lossAfterMs },
            live: Set(s.datacenters.filter(\.acceptsWork).map(\.name)),
            declared: i.declaredQueues(continuing: &scan, pages: DeclaredQueueScan.pagesPerLook),
            named: queues.split(separator: ",").map(String.init))
        s.ingress = s.airflow.lists.map { ($0.list, $0.depth) }
        let l = try await i.leases()
        s.leases = l.count
        s.expiredLeases = l.filter { $0.remainingMs < 0 }.count
        s.deadLetters = Int(try await i.client.send(["LLEN", "{tandem}:dlq"]).int ?? 0)
        s.leader = try await i.leaderLease()
        s.memory = try await i.memory()
        s.celeryReserved = try await i.celeryReservedCount()
        return s
    }

    func render(url: String, interval: Double, interactive: Bool) -> [String] {
        let stamp = ISO8601DateFormatter().string(from: at)
        var out = [
            Style.paint("tandem watch", Style.bold) + "  \(url)  \(stamp)  every \(interval)s"
                + (interactive ? "  (q quits)" : ""),
            "",
        ]
        if let error {
            out.append(Style.paint("cannot reach Redis: \(error) — retrying", Style.red))
            return out
        }
        out += table(["DATACENTER", "STATUS", "WORKERS", "BUSY/SLOTS", "WHY"], datacenters.map {
            [$0.name, $0.status.rawValue, String($0.liveWorkers), "\($0.busy)/\($0.slots)", $0.reason]
        }) { _, col, text in col == 1 ? Style.state(text) : nil }
        out.append(leaderLine(leader)
            ?? Style.paint("dispatcher: none leads — nothing is dispatched, reclaimed or drained (executorctl dispatcher)", Style.red))
        if let memory { out.append(memoryLine(memory)) }
        if let line = celeryReservedLine(celeryReserved) { out.append(Style.paint(line, Style.yellow)) }
        out.append("")
        let pending = ingress.map(\.depth).reduce(0, +)
        out += table(["DATACENTER", "QUEUE", "DEPTH", "IN FLIGHT", "OLDEST"], queues.map {
            [$0.datacenter, $0.queue, String($0.depth), String($0.inFlight), seconds($0.oldestAgeMs)]
        }) { row, col, _ in col == 4 && queues[row].oldestAgeMs > 60_000 ? Style.yellow : nil }
        let nonEmpty = ingress.filter { $0.depth > 0 }
            .map { "\(printableList($0.list)) \($0.depth)" }
        out.append("waiting in Airflow's lists: \(pending)" + (nonEmpty.isEmpty ? "" : "  (" + nonEmpty.joined(separator: ", ") + ")"))
        for (q, why) in airflow.stranded.sorted(by: { $0.key < $1.key }) {
            out.append(Style.paint("stranded: \(airflow.waiting[q] ?? 0) in '\(q)' — \(why)", Style.red))
        }
        out.append("")
        out += table(["WORKER", "DC", "BUSY/SLOTS", "SPOOLED", "STATE", "LAST HEARTBEAT"], workers.map {
            [$0.workerID, $0.datacenter, "\($0.busy)/\($0.slots)", String($0.spooledWrites), $0.state.rawValue,
             seconds(nowMs - $0.lastSeenMs) + " ago"]
        }) { row, col, text in
            // results waiting on the worker's disk: Postgres is unreachable from it
            if col == 3 { return workers[row].spooledWrites > 0 ? Style.red : nil }
            if col == 4 { return Style.state(text) }
            return col == 5 && nowMs - workers[row].lastSeenMs > 15_000 ? Style.red : nil
        }
        out.append("")
        let leaseText = "leases \(leases)" + (expiredLeases > 0 ? " (\(expiredLeases) expired, awaiting reclaim)" : "")
        out.append(Style.paint(leaseText, expiredLeases > 0 ? Style.red : nil) + "    "
            + Style.paint("dead letters \(deadLetters)", deadLetters > 0 ? Style.yellow : nil))
        return out
    }

    var json: [String: Any] {
        if let error { return ["at": ISO8601DateFormatter().string(from: at), "error": error] }
        return [
            "at": ISO8601DateFormatter().string(from: at),
            "datacenters": datacenters.map { ["datacenter": $0.name, "status": $0.status.rawValue, "reason": $0.reason, "live_workers": $0.liveWorkers, "slots": $0.slots, "busy": $0.busy] as [String: Any] },
            "queues": queues.map { ["datacenter": $0.datacenter, "queue": $0.queue, "depth": $0.depth, "in_flight": $0.inFlight, "oldest_age_ms": $0.oldestAgeMs] as [String: Any] },
            "ingress": ingress.map { ["list": $0.list, "depth": $0.depth] as [String: Any] },
            "stranded": airflow.stranded.sorted(by: { $0.key < $1.key }).map { ["queue": $0.key, "waiting": airflow.waiting[$0.key] ?? 0, "reason": $0.value] as [String: Any] },
            "workers": workers.map { ["worker": $0.workerID, "datacenter": $0.datacenter, "busy": $0.busy, "slots": $0.slots, "state": $0.state.rawValue, "last_heartbeat_ms_ago": nowMs - $0.lastSeenMs, "spooled_writes": $0.spooledWrites] as [String: Any] },
            "leases": leases, "expired_leases": expiredLeases, "dead_letters": deadLetters,
            "dispatcher": leaderJSON(leader),
            "celery_reserved": celeryReserved.count,
            "redis_memory": ["used_bytes": memory?.usedBytes ?? 0, "max_bytes": memory?.maxBytes ?? 0, "policy": memory?.policy ?? ""] as [String: Any],
        ]
    }
}
