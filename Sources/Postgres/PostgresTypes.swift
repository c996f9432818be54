/// Every failure of the Postgres module: a code, a one-line message a person can act on, and the cause.
public struct PostgresError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Code: String, Sendable {
        /// The result-backend URL or conninfo could not be understood.
        case invalidURL
        /// No connection could be made.
        case connectionFailed
        /// A statement failed (see `sqlState`), or the connection broke while it ran.
        case query
        /// The client was closed.
        case closed
        /// A transaction could not be committed, or a transaction handle was used outside its body.
        case transaction
    }

    /// What kind of failure this is.
    public var code: Code
    /// One line saying what failed, where (URL without password) and what to do.
    public var message: String
    /// The five-character SQLSTATE the server reported, if any (e.g. `23505` for a unique violation).
    public var sqlState: String?
    /// libpq's own words, if any.
    public var underlying: String?
    /// True when the connection is gone (the next call reconnects); the statement may or may not have run.
    public var isConnectionLoss: Bool

    /// Makes an error.
    public init(code: Code, message: String, sqlState: String? = nil, underlying: String? = nil, isConnectionLoss: Bool = false) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.underlying = underlying
        self.isConnectionLoss = isConnectionLoss
    }

    /// The message.
    public var description: String { message }
}

/// A statement parameter. `bytea` travels in binary format; the others as text the server converts.
public enum PostgresBind: Sendable, Hashable {
    /// Text; the server infers the parameter's type from the statement (so timestamps and JSON work too).
    case text(String)
    /// Raw bytes, sent in binary as `bytea` (NULs are fine).
    case bytea([UInt8])
    /// An integer, sent as its decimal text.
    case int(Int64)
    /// SQL NULL.
    case null
}

/// One row of a result, in text format.
public struct PostgresRow: Sendable {
    /// Column names, in order.
    public let columns: [String]
    /// Values in text format; nil is SQL NULL.
    public let values: [String?]

    /// Makes a row.
    public init(columns: [String], values: [String?]) {
        self.columns = columns
        self.values = values
    }

    private func index(_ column: String) -> Int? { columns.firstIndex(of: column) }

    /// The value as text; nil for NULL or an unknown column.
    public func string(_ column: String) -> String? { index(column).flatMap { string($0) } }
    /// The value as an integer; nil for NULL, an unknown column or non-integer text.
    public func int(_ column: String) -> Int64? { index(column).flatMap { int($0) } }
    /// A `bytea` value decoded from its `\x` hex text form.
    public func bytea(_ column: String) -> [UInt8]? { index(column).flatMap { bytea($0) } }
    /// True for SQL NULL (and for an unknown column).
    public func isNull(_ column: String) -> Bool { index(column).map { isNull($0) } ?? true }

    /// The value at `index` as text.
    public func string(_ index: Int) -> String? { values.indices.contains(index) ? values[index] : nil }
    /// The value at `index` as an integer.
    public func int(_ index: Int) -> Int64? { string(index).flatMap { Int64($0) } }
    /// The `bytea` value at `index`, decoded from `\x` hex.
    public func bytea(_ index: Int) -> [UInt8]? { string(index).flatMap(PostgresRow.decodeHex) }
    /// True when the value at `index` is SQL NULL.
    public func isNull(_ index: Int) -> Bool { string(index) == nil }

    static func decodeHex(_ text: String) -> [UInt8]? {
        let u = Array(text.utf8)
        guard u.count >= 2, u[0] == UInt8(ascii: "\\"), u[1] == UInt8(ascii: "x"), u.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity((u.count - 2) / 2)
        var i = 2
        while i < u.count {
            guard let hi = nibble(u[i]), let lo = nibble(u[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}

/// What a statement returned.
public struct PostgresResult: Sendable {
    /// The rows (empty for statements that return none).
    public var rows: [PostgresRow]
    /// Column names, in order.
    public var columns: [String]
    /// Rows inserted, updated or deleted (or selected), from the command tag.
    public var affectedRows: Int

    /// Makes a result.
    public init(rows: [PostgresRow], columns: [String], affectedRows: Int) {
        self.rows = rows
        self.columns = columns
        self.affectedRows = affectedRows
    }
}
