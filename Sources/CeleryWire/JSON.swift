// A small, byte-level JSON model, parser and serializer.
//
// Why not JSONSerialization: it is slow on Linux, loses key order (which we need to re-emit envelopes
// faithfully) and turns booleans into numbers. Every message a worker takes passes through here.

/// A JSON value. Integers that fit in `Int64` stay exact; larger ones fall back to `.double`.
public enum JSONValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)
}

/// A JSON object that keeps its keys in document order, so re-encoding an envelope reproduces it.
///
/// Equality and hashing ignore key order: two objects are equal when they hold the same keys with
/// equal values.
public struct JSONObject: Sendable, Hashable, ExpressibleByDictionaryLiteral, Sequence {
    /// The key/value pairs in document order.
    public var pairs: [(String, JSONValue)]

    /// An empty object.
    public init() { pairs = [] }

    /// An object with these pairs, in this order.
    public init(_ pairs: [(String, JSONValue)]) { self.pairs = pairs }

    public init(dictionaryLiteral elements: (String, JSONValue)...) { pairs = elements }

    /// The value for `key` (the first one, if a document repeats a key); setting appends a new key
    /// at the end or replaces the value in place.
    public subscript(key: String) -> JSONValue? {
        get {
            for (k, v) in pairs where k == key { return v }
            return nil
        }
        set {
            if let i = pairs.firstIndex(where: { $0.0 == key }) {
                if let newValue { pairs[i].1 = newValue } else { pairs.remove(at: i) }
            } else if let newValue {
                pairs.append((key, newValue))
            }
        }
    }

    /// The keys in document order.
    public var keys: [String] { pairs.map(\.0) }
    /// Number of keys.
    public var count: Int { pairs.count }
    /// True when there are no keys.
    public var isEmpty: Bool { pairs.isEmpty }

    public func makeIterator() -> IndexingIterator<[(String, JSONValue)]> { pairs.makeIterator() }

    public static func == (lhs: JSONObject, rhs: JSONObject) -> Bool {
        guard lhs.pairs.count == rhs.pairs.count else { return false }
        for (k, v) in lhs.pairs where rhs[k] != v { return false }
        return true
    }

    public func hash(into hasher: inout Hasher) {
        // Order-independent: combine per-pair hashes commutatively.
        var acc = 0
        for (k, v) in pairs {
            var h = Hasher()
            h.combine(k)
            h.combine(v)
            acc ^= h.finalize()
        }
        hasher.combine(pairs.count)
        hasher.combine(acc)
    }
}

extension JSONValue {
    /// The string, if this is `.string`.
    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    /// The integer, if this is `.int`, or a `.double` with an exact integral value.
    public var int: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d) where d.rounded() == d && abs(d) < 9.2e18: return Int64(d)
        default: return nil
        }
    }
    /// The number as a `Double`, if this is `.int` or `.double`.
    public var double: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }
    /// The boolean, if this is `.bool`.
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    /// The elements, if this is `.array`.
    public var array: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }
    /// The object, if this is `.object`.
    public var object: JSONObject? { if case .object(let o) = self { return o } else { return nil } }
    /// True for `.null`.
    public var isNull: Bool { if case .null = self { return true } else { return false } }
    /// `self[key]` on an object; nil for any other value or a missing key.
    public subscript(key: String) -> JSONValue? { object?[key] }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByFloatLiteral, ExpressibleByArrayLiteral, ExpressibleByNilLiteral, ExpressibleByDictionaryLiteral
{
    public init(dictionaryLiteral elements: (String, JSONValue)...) { self = .object(JSONObject(elements)) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(nilLiteral: ()) { self = .null }
}

// MARK: - Parsing

extension JSONValue {
    /// Parses one JSON document (RFC 8259) from UTF-8 bytes. Trailing non-whitespace is an error.
    public static func parse(_ bytes: [UInt8]) throws(WireError) -> JSONValue {
        try bytes.withUnsafeBufferPointer { (buf) throws(WireError) -> JSONValue in
            var p = JSONParser(buf)
            let v = try p.parseDocument()
            return v
        }
    }

    /// Parses one JSON document from a string.
    public static func parse(_ s: String) throws(WireError) -> JSONValue {
        var s = s
        var result: Result<JSONValue, WireError> = .success(.null)
        s.withUTF8 { buf in
            var p = JSONParser(buf)
            do throws(WireError) { result = .success(try p.parseDocument()) } catch { result = .failure(error) }
        }
        return try result.get()
    }
}

struct JSONParser {
    let b: UnsafeBufferPointer<UInt8>
    var i = 0
    var depth = 0
    static let maxDepth = 512

    init(_ b: UnsafeBufferPointer<UInt8>) { self.b = b }

    func fail(_ what: String) -> WireError {
        WireError(.notJSON, "invalid JSON at byte \(i): \(what)")
    }

    mutating func skipWS() {
        while i < b.count {
            let c = b[i]
            if c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { i += 1 } else { return }
        }
    }

    mutating func parseDocument() throws(WireError) -> JSONValue {
        skipWS()
        let v = try parseValue()
        skipWS()
        if i != b.count { throw fail("unexpected trailing data") }
        return v
    }

    mutating func parseValue() throws(WireError) -> JSONValue {
        guard i < b.count else { throw fail("unexpected end of input") }
        switch b[i] {
        case UInt8(ascii: "{"): return .object(try parseObject())
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"):
            try literal("true")
            return .bool(true)
        case UInt8(ascii: "f"):
            try literal("false")
            return .bool(false)
        case UInt8(ascii: "n"):
            try literal("null")
            return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        // Python's json module writes these for non-finite floats; accept them like json.loads does.
        case UInt8(ascii: "N"):
            try literal("NaN")
            return .double(.nan)
        case UInt8(ascii: "I"):
            try literal("Infinity")
            return .double(.infinity)
        default: throw fail("unexpected character '\(Unicode.Scalar(b[i]))'")
        }
    }

    mutating func literal(_ word: StaticString) throws(WireError) {
        let n = word.utf8CodeUnitCount
        guard i + n <= b.count else { throw fail("truncated literal") }
        let w = word.utf8Start
        for k in 0..<n where b[i + k] != w[k] { throw fail("bad literal") }
        i += n
    }

    mutating func enter() throws(WireError) {
        depth += 1
        if depth > Self.maxDepth { throw fail("nesting deeper than \(Self.maxDepth)") }
    }

    mutating func parseObject() throws(WireError) -> JSONObject {
        try enter()
        i += 1
        var pairs: [(String, JSONValue)] = []
        skipWS()
        if i < b.count && b[i] == UInt8(ascii: "}") {
            i += 1
            depth -= 1
            return JSONObject(pairs)
        }
        while true {
            skipWS()
            guard i < b.count, b[i] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
            let key = try parseString()
            skipWS()
            guard i < b.count, b[i] == UInt8(ascii: ":") else { throw fail("expected ':'") }
            i += 1
            skipWS()
            let v = try parseValue()
            pairs.append((key, v))
            skipWS()
            guard i < b.count else { throw fail("unterminated object") }
            if b[i] == UInt8(ascii: ",") {
                i += 1
                continue
            }
            if b[i] == UInt8(ascii: "}") {
                i += 1
                break
            }
            throw fail("expected ',' or '}'")
        }
        depth -= 1
        return JSONObject(pairs)
    }

    mutating func parseArray() throws(WireError) -> JSONValue {
        try enter()
        i += 1
        var items: [JSONValue] = []
        skipWS()
        if i < b.count && b[i] == UInt8(ascii: "]") {
            i += 1
            depth -= 1
            return .array(items)
        }
        while true {
            skipWS()
            items.append(try parseValue())
            skipWS()
            guard i < b.count else { throw fail("unterminated array") }
            if b[i] == UInt8(ascii: ",") {
                i += 1
                continue
            }
            if b[i] == UInt8(ascii: "]") {
                i += 1
                break
            }
            throw fail("expected ',' or ']'")
        }
        depth -= 1
        return .array(items)
    }

    mutating func parseString() throws(WireError) -> String {
        i += 1
        let start = i
        // Fast path: no escapes.
        while i < b.count {
            let c = b[i]
            if c == UInt8(ascii: "\"") {
                let s = String(decoding: UnsafeBufferPointer(rebasing: b[start..<i]), as: UTF8.self)
                i += 1
                return s
            }
            if c == UInt8(ascii: "\\") { break }
            if c < 0x20 { throw fail("control character in string") }
            i += 1
        }
        var out = [UInt8]()
        out.reserveCapacity(i - start + 16)
        out.append(contentsOf: UnsafeBufferPointer(rebasing: b[start..<i]))
        while i < b.count {
            let c = b[i]
            if c == UInt8(ascii: "\"") {
                i += 1
                return String(decoding: out, as: UTF8.self)
            }
            if c < 0x20 { throw fail("control character in string") }
            if c != UInt8(ascii: "\\") {
                out.append(c)
                i += 1
                continue
            }
            i += 1
            guard i < b.count else { break }
            let e = b[i]
            i += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try hex4()
                if (0xD800..<0xDC00).contains(scalar) {
                    // High surrogate: combine with a following \uDC00-\uDFFF, else U+FFFD (like a lone one).
                    if i + 1 < b.count, b[i] == UInt8(ascii: "\\"), b[i + 1] == UInt8(ascii: "u") {
                        let save = i
                        i += 2
                        let low = try hex4()
                        if (0xDC00..<0xE000).contains(low) {
                            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            i = save
                            scalar = 0xFFFD
                        }
                    } else {
                        scalar = 0xFFFD
                    }
                } else if (0xDC00..<0xE000).contains(scalar) {
                    scalar = 0xFFFD
                }
                appendUTF8(&out, scalar)
            default: throw fail("bad escape '\\\(Unicode.Scalar(e))'")
            }
        }
        throw fail("unterminated string")
    }

    mutating func hex4() throws(WireError) -> UInt32 {
        guard i + 4 <= b.count else { throw fail("truncated \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = b[i]
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - 0x30)
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - 0x57)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - 0x37)
            default: throw fail("bad hex digit in \\u escape")
            }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    mutating func parseNumber() throws(WireError) -> JSONValue {
        let start = i
        var negative = false
        if b[i] == UInt8(ascii: "-") {
            negative = true
            i += 1
            if i < b.count && b[i] == UInt8(ascii: "I") {
                try literal("Infinity")
                return .double(-.infinity)
            }
        }
        var value: Int64 = 0
        var overflow = false
        let digitsStart = i
        while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
            let d = Int64(b[i] - 0x30)
            if !overflow {
                let (m, o1) = value.multipliedReportingOverflow(by: 10)
                let (s, o2) = negative ? m.subtractingReportingOverflow(d) : m.addingReportingOverflow(d)
                if o1 || o2 { overflow = true } else { value = s }
            }
            i += 1
        }
        if i == digitsStart { throw fail("expected digits") }
        if b[digitsStart] == UInt8(ascii: "0") && i - digitsStart > 1 { throw fail("leading zero in number") }
        var isFloat = false
        if i < b.count && b[i] == UInt8(ascii: ".") {
            isFloat = true
            i += 1
            let f = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
            if i == f { throw fail("expected digits after '.'") }
        }
        if i < b.count && (b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E")) {
            isFloat = true
            i += 1
            if i < b.count && (b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-")) { i += 1 }
            let f = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
            if i == f { throw fail("expected exponent digits") }
        }
        if !isFloat && !overflow { return .int(value) }
        let text = String(decoding: UnsafeBufferPointer(rebasing: b[start..<i]), as: UTF8.self)
        guard let d = Double(text) else { throw fail("bad number") }
        return .double(d)
    }
}

@inline(__always)
func appendUTF8(_ out: inout [UInt8], _ scalar: UInt32) {
    switch scalar {
    case 0..<0x80:
        out.append(UInt8(scalar))
    case 0x80..<0x800:
        out.append(UInt8(0xC0 | (scalar >> 6)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    case 0x800..<0x10000:
        out.append(UInt8(0xE0 | (scalar >> 12)))
        out.append(UInt8(0x80 | ((scalar >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    default:
        out.append(UInt8(0xF0 | (scalar >> 18)))
        out.append(UInt8(0x80 | ((scalar >> 12) & 0x3F)))
        out.append(UInt8(0x80 | ((scalar >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (scalar & 0x3F)))
    }
}

// MARK: - Serializing

extension JSONValue {
    /// How to write JSON text.
    public enum Style: Sendable {
        /// `{"a":1,"b":[2,3]}`, non-ASCII written as UTF-8.
        case compact
        /// Exactly what Python's `json.dumps(v)` writes with its defaults (as kombu and celery do):
        /// `{"a": 1, "b": [2, 3]}`, every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
        case python
    }

    /// Compact JSON text.
    public func serialized() -> String { serialized(style: .compact) }

    /// JSON text in the given style.
    public func serialized(style: Style) -> String {
        var out = [UInt8]()
        out.reserveCapacity(256)
        write(to: &out, style: style)
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the JSON text as UTF-8.
    public func write(to out: inout [UInt8], style: Style = .compact) {
        let py = style == .python
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let v): out.append(contentsOf: (v ? "true" : "false").utf8)
        case .int(let v): out.append(contentsOf: String(v).utf8)
        case .double(let v): out.append(contentsOf: pythonFloatRepr(v).utf8)
        case .string(let s): writeJSONString(s, to: &out, asciiOnly: py)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (n, v) in a.enumerated() {
                if n > 0 { out.append(contentsOf: py ? [0x2C, 0x20] : [0x2C]) }
                v.write(to: &out, style: style)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            for (n, (k, v)) in o.pairs.enumerated() {
                if n > 0 { out.append(contentsOf: py ? [0x2C, 0x20] : [0x2C]) }
                writeJSONString(k, to: &out, asciiOnly: py)
                out.append(contentsOf: py ? [0x3A, 0x20] : [0x3A])
                v.write(to: &out, style: style)
            }
            out.append(UInt8(ascii: "}"))
        }
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): shortest round-trip digits, `1e-07`, `1e+16`, `1.0`.
func pythonFloatRepr(_ v: Double) -> String {
    if v.isNaN { return "NaN" }
    if v.isInfinite { return v < 0 ? "-Infinity" : "Infinity" }
    // Swift's description is also shortest round-trip; it differs from Python only in the exponent form
    // ("1e-07" in both, but Swift writes "1e+16" too) and in the switch-over points, which match for
    // the magnitudes we emit (time limits, timestamps).
    var s = v.description
    if let e = s.firstIndex(of: "e") {
        var mant = String(s[..<e])
        var exp = String(s[s.index(after: e)...])
        if mant.hasSuffix(".0") { mant.removeLast(2) }
        var sign = "+"
        if exp.hasPrefix("-") {
            sign = "-"
            exp.removeFirst()
        } else if exp.hasPrefix("+") {
            exp.removeFirst()
        }
        if exp.count < 2 { exp = "0" + exp }
        s = mant + "e" + sign + exp
    }
    return s
}

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

func writeJSONString(_ s: String, to out: inout [UInt8], asciiOnly: Bool) {
    out.append(UInt8(ascii: "\""))
    func u4(_ v: UInt32) {
        out.append(contentsOf: [0x5C, 0x75])
        out.append(hexDigits[Int((v >> 12) & 0xF)])
        out.append(hexDigits[Int((v >> 8) & 0xF)])
        out.append(hexDigits[Int((v >> 4) & 0xF)])
        out.append(hexDigits[Int(v & 0xF)])
    }
    if !asciiOnly {
        for c in s.utf8 {
            switch c {
            case 0x22: out.append(contentsOf: [0x5C, 0x22])
            case 0x5C: out.append(contentsOf: [0x5C, 0x5C])
            case 0x0A: out.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0x08: out.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0..<0x20: u4(UInt32(c))
            default: out.append(c)
            }
        }
    } else {
        for u in s.unicodeScalars {
            let v = u.value
            switch v {
            case 0x22: out.append(contentsOf: [0x5C, 0x22])
            case 0x5C: out.append(contentsOf: [0x5C, 0x5C])
            case 0x0A: out.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0x08: out.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0..<0x20, 0x7F..<0x10000: u4(v)
            case 0x20..<0x7F: out.append(UInt8(v))
            default:
                let x = v - 0x10000
                u4(0xD800 + (x >> 10))
                u4(0xDC00 + (x & 0x3FF))
            }
        }
    }
    out.append(UInt8(ascii: "\""))
}
