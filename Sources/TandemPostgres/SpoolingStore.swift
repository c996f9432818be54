import CeleryWire
import Foundation
import Logging
import Postgres
import Synchronization
import TandemCore

#if canImport(Glibc)
    import Glibc
#endif

/// The worker's result backend and ledger when Postgres may go away: while Postgres is unreachable, every write
/// is appended (and fsynced) to a local spool file, and a flusher replays the spool in order once Postgres is
/// back. Each replayed write commits in the same transaction as the spool's progress marker, so a crash during
/// the flush neither loses a write nor applies one twice. Tasks keep running throughout.
public final class SpoolingStore: StoreOperationSink {
    public let postgres: PostgresStore
    let directory: String
    let logger: Logger

    final class State: @unchecked Sendable {
        /// The spool being written, while Postgres is (or recently was) unreachable. All writes go there until
        /// the flusher has replayed it completely, so one task's writes never overtake each other.
        var active: SpoolFile? { didSet { spooling.withLock { $0 = active != nil } } }
        var flushing = false
        /// `active != nil`, readable from any thread: while nothing is spooled (nearly always), a write goes
        /// straight to Postgres instead of first visiting the spool's thread to learn that.
        let spooling = Mutex(false)
        /// Lines written to the active spool, and how many of them the flusher has applied to Postgres: readable
        /// from any thread (the heartbeat reports the difference).
        let lines = Mutex((written: 0, applied: 0))
    }
    /// Touched only on `disk`: a serial queue of its own, so the appends (each an fsync) never block a thread
    /// of the Swift concurrency pool and stay in order.
    private let state = State()
    private let disk = DispatchQueue(label: "tandem.spool")
    /// Set when the worker started without reaching Postgres: every write is spooled until this (connect and
    /// migrate the schema) has succeeded, which the flusher does before replaying anything.
    private let unprepared = Mutex<(@Sendable () async throws -> Void)?>(nil)

    /// Runs `body` on the spool's own thread and suspends the caller until it is done.
    private func onDisk<T: Sendable>(_ body: @escaping @Sendable (State) throws -> T) async throws -> T {
        let state = self.state
        return try await withCheckedThrowingContinuation { cont in
            disk.async { cont.resume(with: Result { try body(state) }) }
        }
    }

    /// - Parameter directory: where spool files live (created 0700). Spools left by a worker that died are
    ///   picked up and flushed by the next worker that starts with the same directory.
    public init(postgres: PostgresStore, directory: String, logger: Logger) throws {
        self.postgres = postgres
        self.directory = directory
        self.logger = logger
        do {
            try FileManager.default.createDirectory(
                atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw SpoolError("cannot create the result spool directory \(directory): \(error) — set --spool-dir to a writable local directory")
        }
    }

    /// Starts flushing any spool files left behind by an earlier worker.
    public func recoverLeftovers() {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        let leftovers = files.filter { $0.hasSuffix(".spool") }.sorted()
        guard !leftovers.isEmpty else { return }
        Task {
            for name in leftovers {
                guard let spool = try? SpoolFile(path: directory + "/" + name, create: false) else { continue }
                logger.warning("found a result spool left by an earlier worker (\(name)); flushing it to Postgres")
                await flushUntilDone(spool, isActive: false)
            }
        }
    }

    public var writesWaitingLocally: Int { state.lines.withLock { max(0, $0.written - $0.applied) } }

    /// Postgres could not be reached when the worker started: from now on every write is spooled, and the flusher
    /// first runs `prepare` (connect, migrate the schema), retrying until it succeeds, then replays the spool.
    /// A worker restarted during a Postgres outage so keeps its datacenter alive instead of crash-looping.
    public func startWithoutPostgres(prepare: @escaping @Sendable () async throws -> Void) {
        unprepared.withLock { $0 = prepare }
    }

    // MARK: The one path every write takes

    func run(_ op: StoreOperation) async throws -> StoreOutcome {
        if let outcome = try await appendIfSpooling(op) { return outcome }
        if unprepared.withLock({ $0 }) != nil { return try await spool(op) }
        do {
            return try await postgres.apply(op)
        } catch let e as PostgresError where e.isOutage {
            logger.error("Postgres is unreachable (\(e.message)); spooling results on local disk in \(directory) until it is back")
            return try await spool(op)
        } catch let e as PostgresError where e.isPassingRefusal {
            // the server answers but cannot write now (read-only after a failover, disk full, shutting down, a
            // statement timeout): the same as an outage for this write. Not spooling it would leave the job's lease
            // to expire, and the finished task would run again (and be dead-lettered after max attempts).
            logger.error("Postgres refuses writes for now (SQLSTATE \(e.sqlState ?? "?"): \(e.message)); spooling results on local disk in \(directory) until it takes them — check the result backend (is it a read-only standby? is its disk full?)")
            return try await spool(op)
        }
    }

    private func appendIfSpooling(_ op: StoreOperation) async throws -> StoreOutcome? {
        // a spool that starts just after this look is the same race as one that starts just after the append
        // below found none: this write was already on its way to Postgres
        guard state.spooling.withLock({ $0 }) else { return nil }
        return try await onDisk { s in
            guard let active = s.active else { return nil }
            try active.append(op)
            s.lines.withLock { $0.written += 1 }
            return .spooled
        }
    }

    private func spool(_ op: StoreOperation) async throws -> StoreOutcome {
        let directory = self.directory
        let (spool, startFlusher) = try await onDisk { s -> (SpoolFile, Bool) in
            if s.active == nil {
                s.active = try SpoolFile(
                    path: "\(directory)/\(Int(Date().timeIntervalSince1970 * 1000))-\(UUID().uuidString).spool", create: true)
            }
            try s.active!.append(op)
            s.lines.withLock { $0.written += 1 }
            let start = !s.flushing
            s.flushing = true
            return (s.active!, start)
        }
        if startFlusher { Task { await self.flushUntilDone(spool, isActive: true) } }
        return .spooled
    }

    /// Replays `spool` in order; returns once every line is applied and (for the active spool) no new line came.
    func flushUntilDone(_ spool: SpoolFile, isActive: Bool) async {
        var wait = Duration.milliseconds(500)
        while true {
            do {
                if let prepare = unprepared.withLock({ $0 }) {
                    try await prepare()
                    if unprepared.withLock({ p in defer { p = nil }; return p != nil }) {
                        logger.notice("Postgres answers: its schema is ready; replaying the results spooled since the worker started")
                    }
                }
                let ops = try await onDisk { _ in try spool.readAll() }
                var applied = try await progress(of: spool)
                while applied < ops.count {
                    let op = ops[applied]
                    let index = applied + 1
                    let id = spool.id
                    _ = try await postgres.client.transaction { tx in
                        let outcome = try PostgresStore.apply(op, in: tx)
                        _ = try tx.query(
                            """
                            INSERT INTO tandem_spool_progress (spool_id, applied) VALUES ($1, $2)
                            ON CONFLICT (spool_id) DO UPDATE SET applied = excluded.applied, updated_at = now()
                            """, [.text(id), .int(Int64(index))])
                        return outcome
                    }
                    applied = index
                    if isActive { state.lines.withLock { $0.applied = index } }
                }
                // caught up: retire the spool unless a write arrived meanwhile
                let appliedSoFar = applied
                let done = try await onDisk { s -> Bool in
                    if isActive {
                        guard spool.count == appliedSoFar else { return false }
                        s.active = nil
                        s.flushing = false
                        s.lines.withLock { $0 = (0, 0) }
                    }
                    try spool.remove()
                    return true
                }
                if done {
                    _ = try? await postgres.client.query("DELETE FROM tandem_spool_progress WHERE spool_id = $1", [.text(spool.id)])
                    logger.notice("result spool \(spool.id) flushed: \(applied) write(s) applied to Postgres in order")
                    return
                }
            } catch let e as PostgresError where e.isOutage {
                try? await Task.sleep(for: wait)
                wait = min(wait * 2, .seconds(5))
            } catch {
                logger.error("cannot flush the result spool \(spool.path): \(error) — retrying in 5 s")
                try? await Task.sleep(for: .seconds(5))
            }
        }
    }

    private func progress(of spool: SpoolFile) async throws -> Int {
        let r = try await postgres.client.query(
            "SELECT applied FROM tandem_spool_progress WHERE spool_id = $1", [.text(spool.id)])
        return Int(r.rows.first?.int("applied") ?? 0)
    }

    // MARK: ResultBackend and TaskLedger (the writes come from StoreOperationSink)

    public func perform(_ op: StoreOperation) async throws -> StoreOutcome { try await run(op) }

    public func state(taskID: String) async throws -> CeleryState { try await postgres.state(taskID: taskID) }

    public func entry(taskID: String) async throws -> LedgerEntry? { try await postgres.entry(taskID: taskID) }
}

extension PostgresError {
    /// The server cannot be reached (as opposed to a statement the server refused).
    public var isOutage: Bool { isConnectionLoss || code == .connectionFailed || code == .closed }

    /// The server refused a statement for a reason that passes with time, not because of the statement: connection
    /// exceptions (08), insufficient resources (53: disk full, out of memory, too many connections), operator
    /// intervention (57: shutdown, cannot connect now, a statement timeout or cancel), system errors (58: I/O),
    /// a read-only transaction (25006: a standby, or a primary demoted by a failover), serialization failures and
    /// deadlocks (40001, 40P01) and a lock not available (55P03). A write refused so is spooled and replayed; a
    /// write refused for anything else (a schema or data error) would fail the same way again.
    public var isPassingRefusal: Bool {
        guard let state = sqlState, state.count == 5 else { return false }
        return ["08", "53", "57", "58"].contains(String(state.prefix(2))) || ["25006", "40001", "40P01", "55P03"].contains(state)
    }

    /// A connection refused for a reason that will not pass by itself (a wrong password, an unknown database or
    /// role, a missing pg_hba entry, a certificate that does not verify): at start this fails the worker with the
    /// message, rather than spooling results for a database it may never reach.
    public var isMisconfiguration: Bool {
        let text = (underlying ?? message).lowercased()
        return ["password authentication failed", "no pg_hba.conf entry", "does not exist", "certificate verify failed",
                "root certificate file", "authentication failed", "invalid sslmode", "invalid connection option"]
            .contains { text.contains($0) }
    }
}

public struct SpoolError: Error, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}

/// An append-only file of JSON lines, one `StoreOperation` each, fsynced on every append. Held under an
/// exclusive flock so two workers sharing a directory never flush the same spool.
final class SpoolFile: @unchecked Sendable {
    let path: String
    let id: String
    private let fd: Int32
    private(set) var count = 0

    init(path: String, create: Bool) throws {
        self.path = path
        id = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        fd = open(path, O_RDWR | O_APPEND | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0), 0o600)
        guard fd >= 0 else {
            throw SpoolError("cannot open result spool \(path): \(String(cString: strerror(errno))) — is the disk full or read-only?")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw SpoolError("result spool \(path) is being flushed by another worker")
        }
        if !create { count = try readAll().count }
    }

    deinit { close(fd) }

    func append(_ op: StoreOperation) throws {
        var line = try JSONEncoder().encode(op)
        line.append(0x0A)
        let ok = line.withUnsafeBytes { buf -> Bool in
            var off = 0
            while off < buf.count {
                let n = write(fd, buf.baseAddress! + off, buf.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    return false
                }
                off += n
            }
            return fsync(fd) == 0
        }
        guard ok else {
            throw SpoolError("cannot write to result spool \(path): \(String(cString: strerror(errno))) — is the disk full?")
        }
        count += 1
    }

    func readAll() throws -> [StoreOperation] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let decoder = JSONDecoder()
        // a torn last line (crash mid-append) was never acknowledged to anyone: ignore it
        return data.split(separator: 0x0A).compactMap { try? decoder.decode(StoreOperation.self, from: Data($0)) }
    }

    func remove() throws {
        unlink(path)
    }
}
