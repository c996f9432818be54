/// One reply from Redis, as RESP2 describes it.
public enum RedisValue: Sendable, Hashable {
    /// A status reply such as `+OK`.
    case simpleString(String)
    /// An error reply such as `-ERR unknown command`. Top-level errors from `send` are thrown instead.
    case error(String)
    /// An integer reply.
    case integer(Int64)
    /// A bulk string, binary-safe.
    case bulk([UInt8])
    /// A nil bulk string or nil array.
    case null
    /// A multi-bulk reply.
    case array([RedisValue])

    /// The text of a status reply or of a bulk string decoded as UTF-8; nil for other kinds.
    public var string: String? {
        switch self {
        case .simpleString(let s): return s
        case .bulk(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }

    /// An integer reply, or a status/bulk string that holds a decimal integer.
    public var int: Int64? {
        switch self {
        case .integer(let i): return i
        case .simpleString, .bulk: return string.flatMap { Int64($0) }
        default: return nil
        }
    }

    /// The elements of an array reply; nil for other kinds.
    public var array: [RedisValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    /// The bytes of a bulk string (or the UTF-8 of a status reply); nil for other kinds.
    public var bytes: [UInt8]? {
        switch self {
        case .bulk(let b): return b
        case .simpleString(let s): return Array(s.utf8)
        default: return nil
        }
    }

    /// True for a nil bulk string or nil array.
    public var isNull: Bool {
        if case .null = self { return true }
        return false
    }
}
