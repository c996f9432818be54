import CLibpq
import ClientSupport
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Owns one `PGconn*`. Not thread-safe: used only on its owner's serial queue.
final class PostgresConnection {
    private let conn: OpaquePointer
    let location: String
    /// Statements prepared on this connection, by SQL text: the hot writes run thousands of times a second, and a
    /// prepared statement skips parsing and planning each time (Postgres's CPU per task was mostly that). Bounded,
    /// so a caller with ever-changing SQL cannot grow it; off with TANDEM_PG_PREPARED_STATEMENTS=off (PgBouncer in
    /// transaction mode before 1.21 cannot keep prepared statements).
    private var prepared: [String: String] = [:]
    static let maxPrepared = 64
    static let preparing = ProcessInfo.processInfo.environment["TANDEM_PG_PREPARED_STATEMENTS"] != "off"

    /// How long a reply may take (`PostgresConfiguration.replyTimeout`); nil waits as long as libpq does.
    private let replyTimeout: Duration?
    /// A reply did not come in time: the connection is mid-statement and must not be used again.
    private var timedOut = false

    private init(conn: OpaquePointer, location: String, replyTimeout: Duration?) {
        self.conn = conn
        self.location = location
        self.replyTimeout = replyTimeout
    }

    deinit { PQfinish(conn) }

    /// Connects (blocking; libpq walks a multi-host list and honours target_session_attrs).
    static func open(_ config: PostgresConfiguration) throws(PostgresError) -> PostgresConnection {
        guard let raw = PQconnectdb(config.conninfo) else {
            throw PostgresError(code: .connectionFailed, message: "cannot connect to Postgres at \(config.redacted): out of memory")
        }
        if PQstatus(raw) != CONNECTION_OK {
            let cause = oneLine(PQerrorMessage(raw))
            PQfinish(raw)
            throw PostgresError(
                code: .connectionFailed,
                message: "cannot connect to Postgres at \(config.redacted): \(cause) — \(config.connectHint)",
                underlying: cause,
                isConnectionLoss: true
            )
        }
        return PostgresConnection(conn: raw, location: config.redacted, replyTimeout: config.replyTimeout)
    }

    var isHealthy: Bool { !timedOut && PQstatus(conn) == CONNECTION_OK }

    /// Waits until libpq can hand out the next result without blocking, at most the reply timeout: libpq's own
    /// reads wait forever, and a hung server or a dead link would hold every write behind this one.
    private func awaitReply(_ what: String) throws(PostgresError) {
        guard let replyTimeout else { return }
        let deadline = ContinuousClock.now + replyTimeout
        while PQisBusy(conn) == 1 {
            let left = deadline - ContinuousClock.now
            if left <= .zero {
                timedOut = true
                throw PostgresError(
                    code: .query,
                    message: "Postgres at \(location) did not answer \(what) within \(replyTimeout.shortDescription) (TANDEM_POSTGRES_REPLY_TIMEOUT): a hung server or a dead link — the connection was dropped and the next call reconnects",
                    underlying: "reply timeout", isConnectionLoss: true)
            }
            var fds = pollfd(fd: PQsocket(conn), events: Int16(POLLIN), revents: 0)
            let ready = poll(&fds, 1, Int32(clamping: left.wholeMilliseconds + 1))
            if ready < 0 && errno == EINTR { continue }
            if ready < 0 || (ready > 0 && PQconsumeInput(conn) == 0) {
                let cause = Self.oneLine(PQerrorMessage(conn))
                throw PostgresError(
                    code: .query, message: "lost connection to Postgres at \(location) during \(what): \(cause) — the next call reconnects",
                    underlying: cause, isConnectionLoss: true)
            }
        }
    }

    /// The next result of the statement(s) sent, within the reply timeout; nil once they have all been read.
    private func nextResult(_ what: String) throws(PostgresError) -> OpaquePointer? {
        try awaitReply(what)
        return PQgetResult(conn)
    }

    /// Sends with `send` (a PQsend… call), then reads every result, keeping the last (what PQexec returns).
    private func sendAndCollect(_ what: String, _ send: () -> Int32) throws(PostgresError) -> OpaquePointer? {
        guard send() == 1 else { return nil }
        var last: OpaquePointer?
        do throws(PostgresError) {
            while let r = try nextResult(what) {
                if let last { PQclear(last) }
                last = r
            }
        } catch {
            if let last { PQclear(last) }
            throw error
        }
        return last
    }

    /// Runs one statement with parameters (PQexecParams; never string interpolation).
    func exec(_ sql: String, _ binds: [PostgresBind]) throws(PostgresError) -> PostgresResult {
        let params = Parameters(binds)
        defer { params.release() }
        let name = try preparedName(sql, params.types)
        let result = try sendAndCollect(Self.verb(sql)) {
            params.withPointers { n, types, values, lengths, formats in
                if let name {
                    PQsendQueryPrepared(conn, name, n, values, lengths, formats, 0)
                } else {
                    PQsendQueryParams(conn, sql, n, types, values, lengths, formats, 0)
                }
            }
        }
        guard let result else {
            let cause = Self.oneLine(PQerrorMessage(conn))
            throw PostgresError(code: .query, message: "Postgres at \(location) failed: \(cause)", underlying: cause,
                                isConnectionLoss: !isHealthy)
        }
        defer { PQclear(result) }
        return try read(result, sql)
    }

    /// Runs `statements` as one pipeline: all sent at once and one Sync, so they cost one round trip, and Postgres
    /// runs them as one implicit transaction committed at the Sync — all of them or none.
    func pipeline(_ statements: [(sql: String, binds: [PostgresBind])]) throws(PostgresError) -> [PostgresResult] {
        let params = statements.map { Parameters($0.binds) }
        defer { for p in params { p.release() } }
        // prepare first: a statement new to this connection is prepared in its own round trip, once
        var names: [String?] = []
        for (st, p) in zip(statements, params) { names.append(try preparedName(st.sql, p.types)) }
        guard PQenterPipelineMode(conn) == 1 else {
            throw PostgresError(code: .query, message: "Postgres at \(location): cannot enter pipeline mode: \(Self.oneLine(PQerrorMessage(conn)))",
                                isConnectionLoss: !isHealthy)
        }
        defer { PQexitPipelineMode(conn) }
        for ((st, p), name) in zip(zip(statements, params), names) {
            let sent = p.withPointers { n, types, values, lengths, formats in
                if let name {
                    PQsendQueryPrepared(conn, name, n, values, lengths, formats, 0)
                } else {
                    PQsendQueryParams(conn, st.sql, n, types, values, lengths, formats, 0)
                }
            }
            if sent != 1 { throw lostInPipeline() }
        }
        if PQpipelineSync(conn) != 1 { throw lostInPipeline() }
        var results: [PostgresResult] = []
        var firstError: PostgresError?
        for st in statements {
            guard let r = try nextResult("a pipelined batch") else { throw lostInPipeline() }
            let status = PQresultStatus(r)
            if status == PGRES_PIPELINE_ABORTED {
                results.append(PostgresResult(rows: [], columns: [], affectedRows: 0))
            } else {
                do throws(PostgresError) {
                    results.append(try read(r, st.sql))
                } catch {
                    if firstError == nil { firstError = error }
                    results.append(PostgresResult(rows: [], columns: [], affectedRows: 0))
                }
            }
            PQclear(r)
            // each statement's results end with a NULL
            while let extra = try nextResult("a pipelined batch") { PQclear(extra) }
        }
        guard let sync = try nextResult("a pipelined batch") else { throw lostInPipeline() }
        let synced = PQresultStatus(sync) == PGRES_PIPELINE_SYNC
        PQclear(sync)
        if let firstError { throw firstError }
        if !synced { throw lostInPipeline() }
        return results
    }

    private func lostInPipeline() -> PostgresError {
        let cause = Self.oneLine(PQerrorMessage(conn))
        return PostgresError(
            code: .query, message: "lost connection to Postgres at \(location) during a pipelined batch: \(cause) — the next call reconnects",
            underlying: cause, isConnectionLoss: true)
    }

    /// A result's rows, or the error it reports.
    private func read(_ result: OpaquePointer, _ sql: String) throws(PostgresError) -> PostgresResult {
        let status = PQresultStatus(result)
        guard status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK || status == PGRES_EMPTY_QUERY else {
            throw failure(result, sql)
        }
        let nfields = Int(PQnfields(result))
        let ntuples = Int(PQntuples(result))
        var columns: [String] = []
        columns.reserveCapacity(nfields)
        for j in 0..<nfields { columns.append(PQfname(result, Int32(j)).map { String(cString: $0) } ?? "") }
        var rows: [PostgresRow] = []
        rows.reserveCapacity(ntuples)
        for i in 0..<ntuples {
            var vals: [String?] = []
            vals.reserveCapacity(nfields)
            for j in 0..<nfields {
                if PQgetisnull(result, Int32(i), Int32(j)) != 0 {
                    vals.append(nil)
                } else {
                    vals.append(String(cString: PQgetvalue(result, Int32(i), Int32(j))))
                }
            }
            rows.append(PostgresRow(columns: columns, values: vals))
        }
        let affected = PQcmdTuples(result).map { Int(String(cString: $0)) ?? 0 } ?? 0
        return PostgresResult(rows: rows, columns: columns, affectedRows: affected)
    }

    /// One statement's parameters as libpq takes them: text, except bytea which goes binary (no escaping).
    private struct Parameters {
        var values: [UnsafeMutablePointer<CChar>?] = []
        var lengths: [Int32] = []
        var formats: [Int32] = []
        var types: [Oid] = []

        init(_ binds: [PostgresBind]) {
            values.reserveCapacity(binds.count)
            for bind in binds {
                switch bind {
                case .null:
                    values.append(nil); lengths.append(0); formats.append(0); types.append(0)
                case .text(let s):
                    values.append(Self.copy(Array(s.utf8) + [0])); lengths.append(0); formats.append(0); types.append(0)
                case .int(let i):
                    values.append(Self.copy(Array(String(i).utf8) + [0])); lengths.append(0); formats.append(0); types.append(0)
                case .bytea(let b):
                    values.append(Self.copy(b)); lengths.append(Int32(b.count)); formats.append(1); types.append(17)
                }
            }
        }

        func release() { for v in values { v?.deallocate() } }

        func withPointers<R>(
            _ body: (Int32, [Oid], UnsafePointer<UnsafePointer<CChar>?>?, [Int32], [Int32]) -> R
        ) -> R {
            values.withUnsafeBufferPointer { vp in
                vp.withMemoryRebound(to: UnsafePointer<CChar>?.self) { cvp in
                    body(Int32(values.count), types, cvp.baseAddress, lengths, formats)
                }
            }
        }

        private static func copy(_ bytes: [UInt8]) -> UnsafeMutablePointer<CChar> {
            let p = UnsafeMutablePointer<CChar>.allocate(capacity: max(bytes.count, 1))
            bytes.withUnsafeBufferPointer { b in
                if let base = b.baseAddress {
                    UnsafeMutableRawPointer(p).copyMemory(from: base, byteCount: b.count)
                }
            }
            return p
        }
    }

    /// The name `sql` is prepared under on this connection (preparing it on first use), or nil to run it unnamed.
    private func preparedName(_ sql: String, _ types: [Oid]) throws(PostgresError) -> String? {
        guard Self.preparing else { return nil }
        if let name = prepared[sql] { return name }
        guard prepared.count < Self.maxPrepared, Self.isPlannable(sql) else { return nil }
        let name = "tandem_\(prepared.count)"
        guard let result = try sendAndCollect("PREPARE", { PQsendPrepare(conn, name, sql, Int32(types.count), types) }) else {
            let cause = Self.oneLine(PQerrorMessage(conn))
            throw PostgresError(code: .query, message: "Postgres at \(location) failed: \(cause)", underlying: cause,
                                isConnectionLoss: !isHealthy)
        }
        defer { PQclear(result) }
        guard PQresultStatus(result) == PGRES_COMMAND_OK else { throw failure(result, sql) }
        prepared[sql] = name
        return name
    }

    /// Only plain DML and queries are worth preparing (DDL runs once, at start-up).
    private static func isPlannable(_ sql: String) -> Bool {
        let head = sql.drop { $0.isWhitespace }.prefix(6).uppercased()
        return ["SELECT", "INSERT", "UPDATE", "DELETE", "WITH "].contains { head.hasPrefix($0) }
    }

    /// The error a failed statement's result describes, saying whether the connection is gone.
    private func failure(_ result: OpaquePointer, _ sql: String) -> PostgresError {
        let sqlState = PQresultErrorField(result, tandem_pg_diag_sqlstate).map { String(cString: $0) }
        let cause = Self.oneLine(PQresultErrorMessage(result))
        let lost = !isHealthy || (sqlState?.hasPrefix("08") ?? false) || sqlState == "57P01" || sqlState == "57P02"
            || sqlState == "57P03"
        let what = Self.verb(sql)
        let message = lost
            ? "lost connection to Postgres at \(location) during \(what): \(cause) — the next call reconnects"
            : "Postgres at \(location) refused \(what): \(cause)"
        return PostgresError(code: .query, message: message, sqlState: sqlState, underlying: cause, isConnectionLoss: lost)
    }

    /// The command tag of the last statement (e.g. `ROLLBACK` when a COMMIT could not commit).
    func execTag(_ sql: String) throws(PostgresError) -> String {
        guard let result = try sendAndCollect(sql, { PQsendQuery(conn, sql) }) else {
            let cause = Self.oneLine(PQerrorMessage(conn))
            throw PostgresError(code: .query, message: "Postgres at \(location) failed \(sql): \(cause)", underlying: cause,
                                isConnectionLoss: !isHealthy)
        }
        defer { PQclear(result) }
        let status = PQresultStatus(result)
        guard status == PGRES_COMMAND_OK else {
            let sqlState = PQresultErrorField(result, tandem_pg_diag_sqlstate).map { String(cString: $0) }
            let cause = Self.oneLine(PQresultErrorMessage(result))
            let lost = !isHealthy
            throw PostgresError(
                code: .query,
                message: lost ? "lost connection to Postgres at \(location) during \(sql): \(cause) — the next call reconnects"
                    : "Postgres at \(location) refused \(sql): \(cause)",
                sqlState: sqlState, underlying: cause, isConnectionLoss: lost)
        }
        return PQcmdStatus(result).map { String(cString: $0) } ?? ""
    }

    /// The statement's first word, for messages ("INSERT", "SELECT").
    static func verb(_ sql: String) -> String {
        sql.split(whereSeparator: \.isWhitespace).first.map { $0.uppercased() } ?? "a statement"
    }

    static func oneLine(_ s: UnsafePointer<CChar>?) -> String {
        guard let s else { return "unknown error" }
        let text = String(cString: s)
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return lines.isEmpty ? "unknown error" : lines.joined(separator: "; ")
    }
}
