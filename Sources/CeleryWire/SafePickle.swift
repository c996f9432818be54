/// The subset of Python's pickle that cannot import or call anything.
///
/// Celery's database backend unpickles `celery_taskmeta.result` without restriction, so whatever we write
/// must be data only. `dumps` emits protocol 2 with NONE/NEWTRUE/NEWFALSE/BININT*/LONG1/BINFLOAT/BINUNICODE/
/// EMPTY_LIST/EMPTY_DICT/MARK/APPENDS/SETITEMS. `loads` reads what Python itself writes for such values
/// (any protocol, memo opcodes, tuples, bytes) and refuses GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST, OBJ,
/// NEWOBJ, NEWOBJ_EX, EXT*, PERSID and anything else unknown.
public enum SafePickle {
    /// Pickles a JSON value (protocol 2).
    public static func dumps(_ v: JSONValue) -> [UInt8] {
        var out: [UInt8] = [0x80, 2]
        write(v, &out)
        out.append(UInt8(ascii: "."))
        return out
    }

    static func write(_ v: JSONValue, _ out: inout [UInt8]) {
        switch v {
        case .null: out.append(UInt8(ascii: "N"))
        case .bool(let b): out.append(b ? 0x88 : 0x89)
        case .int(let i):
            if i >= 0 && i < 256 {
                out.append(UInt8(ascii: "K"))
                out.append(UInt8(i))
            } else if i >= 0 && i < 65536 {
                out.append(UInt8(ascii: "M"))
                out.append(UInt8(i & 0xFF))
                out.append(UInt8(i >> 8))
            } else if i >= Int64(Int32.min) && i <= Int64(Int32.max) {
                out.append(UInt8(ascii: "J"))
                let u = UInt32(bitPattern: Int32(i))
                for k in 0..<4 { out.append(UInt8((u >> (8 * UInt32(k))) & 0xFF)) }
            } else {
                out.append(0x8A)  // LONG1: 8-byte two's complement little endian
                out.append(8)
                let u = UInt64(bitPattern: i)
                for k in 0..<8 { out.append(UInt8((u >> (8 * UInt64(k))) & 0xFF)) }
            }
        case .double(let d):
            out.append(UInt8(ascii: "G"))
            let u = d.bitPattern
            for k in (0..<8).reversed() { out.append(UInt8((u >> (8 * UInt64(k))) & 0xFF)) }
        case .string(let s):
            out.append(UInt8(ascii: "X"))
            let u = Array(s.utf8)
            let n = UInt32(u.count)
            for k in 0..<4 { out.append(UInt8((n >> (8 * UInt32(k))) & 0xFF)) }
            out.append(contentsOf: u)
        case .array(let a):
            out.append(UInt8(ascii: "]"))
            if !a.isEmpty {
                out.append(UInt8(ascii: "("))
                for x in a { write(x, &out) }
                out.append(UInt8(ascii: "e"))
            }
        case .object(let o):
            out.append(UInt8(ascii: "}"))
            if !o.isEmpty {
                out.append(UInt8(ascii: "("))
                for (k, x) in o.pairs {
                    write(.string(k), &out)
                    write(x, &out)
                }
                out.append(UInt8(ascii: "u"))
            }
        }
    }

    private enum Item {
        case value(JSONValue)
        case mark
    }

    /// Unpickles the safe subset into JSON values (tuples → arrays, bytes → UTF-8 text, non-string dict
    /// keys → their JSON text).
    public static func loads(_ b: [UInt8]) throws(WireError) -> JSONValue {
        var stack: [Item] = []
        var memo: [Int: JSONValue] = [:]
        var i = 0
        func bad(_ why: String) -> WireError { WireError(.badPickle, "pickle rejected at byte \(i): \(why)") }
        func need(_ n: Int) throws(WireError) {
            if i + n > b.count { throw bad("truncated") }
        }
        func le(_ n: Int) throws(WireError) -> UInt64 {
            try need(n)
            var v: UInt64 = 0
            for k in 0..<n { v |= UInt64(b[i + k]) << (8 * UInt64(k)) }
            i += n
            return v
        }
        func text(_ n: Int) throws(WireError) -> String {
            try need(n)
            let s = String(decoding: b[i..<i + n], as: UTF8.self)
            i += n
            return s
        }
        func line() throws(WireError) -> String {
            guard let nl = b[i...].firstIndex(of: 0x0A) else { throw bad("unterminated line") }
            let s = String(decoding: b[i..<nl], as: UTF8.self)
            i = nl + 1
            return s
        }
        func pop() throws(WireError) -> JSONValue {
            guard case .value(let v)? = stack.popLast() else { throw bad("stack underflow") }
            return v
        }
        func popMark() throws(WireError) -> [JSONValue] {
            var items: [JSONValue] = []
            while let top = stack.popLast() {
                switch top {
                case .mark: return items.reversed()
                case .value(let v): items.append(v)
                }
            }
            throw bad("MARK missing")
        }
        func key(_ v: JSONValue) -> String { v.string ?? v.serialized() }
        func signedLE(_ n: Int) throws(WireError) -> JSONValue {
            try need(n)
            if n == 0 { return .int(0) }
            guard n <= 8 else {
                // Beyond Int64: approximate, like our JSON big-int fallback.
                var d = 0.0
                for k in (0..<n).reversed() { d = d * 256 + Double(b[i + k]) }
                if b[i + n - 1] & 0x80 != 0 { d -= pow2(8 * n) }
                i += n
                return .double(d)
            }
            var v: UInt64 = 0
            for k in 0..<n { v |= UInt64(b[i + k]) << (8 * UInt64(k)) }
            if n < 8 && b[i + n - 1] & 0x80 != 0 { v |= ~UInt64(0) << (8 * UInt64(n)) }
            i += n
            return .int(Int64(bitPattern: v))
        }
        while i < b.count {
            let op = b[i]
            i += 1
            switch op {
            case 0x80:
                try need(1)
                i += 1  // PROTO
            case 0x95: _ = try le(8)  // FRAME
            case UInt8(ascii: "."):  // STOP
                guard stack.count == 1, case .value(let v) = stack[0] else { throw bad("STOP with bad stack") }
                return v
            case UInt8(ascii: "N"): stack.append(.value(.null))
            case 0x88: stack.append(.value(.bool(true)))
            case 0x89: stack.append(.value(.bool(false)))
            case UInt8(ascii: "K"): stack.append(.value(.int(Int64(try le(1)))))
            case UInt8(ascii: "M"): stack.append(.value(.int(Int64(try le(2)))))
            case UInt8(ascii: "J"): stack.append(.value(.int(Int64(Int32(bitPattern: UInt32(try le(4)))))))
            case 0x8A:
                let n = Int(try le(1))
                stack.append(.value(try signedLE(n)))  // LONG1
            case 0x8B:
                let n = Int(try le(4))
                stack.append(.value(try signedLE(n)))  // LONG4
            case UInt8(ascii: "I"), UInt8(ascii: "L"):  // INT / LONG (protocol 0)
                var s = try line()
                if s.hasSuffix("L") { s.removeLast() }
                if s == "01" {
                    stack.append(.value(.bool(true)))
                } else if s == "00" {
                    stack.append(.value(.bool(false)))
                } else if let v = Int64(s) {
                    stack.append(.value(.int(v)))
                } else if let d = Double(s) {
                    stack.append(.value(.double(d)))
                } else {
                    throw bad("bad INT")
                }
            case UInt8(ascii: "F"):
                guard let d = Double(try line()) else { throw bad("bad FLOAT") }
                stack.append(.value(.double(d)))
            case UInt8(ascii: "G"):
                try need(8)
                var u: UInt64 = 0
                for k in 0..<8 { u = u << 8 | UInt64(b[i + k]) }
                i += 8
                stack.append(.value(.double(Double(bitPattern: u))))
            case UInt8(ascii: "X"), UInt8(ascii: "B"): stack.append(.value(.string(try text(Int(try le(4))))))
            case 0x8C, UInt8(ascii: "U"), UInt8(ascii: "C"): stack.append(.value(.string(try text(Int(try le(1))))))
            case 0x8D, 0x8E: stack.append(.value(.string(try text(Int(try le(8))))))  // BINUNICODE8 / BINBYTES8
            case UInt8(ascii: "T"): stack.append(.value(.string(try text(Int(try le(4))))))  // BINSTRING
            case UInt8(ascii: "]"), UInt8(ascii: ")"): stack.append(.value(.array([])))
            case UInt8(ascii: "}"): stack.append(.value(.object(JSONObject())))
            case UInt8(ascii: "("): stack.append(.mark)
            case UInt8(ascii: "l"), UInt8(ascii: "t"): stack.append(.value(.array(try popMark())))
            case 0x85:
                let a = try pop()
                stack.append(.value(.array([a])))
            case 0x86:
                let b2 = try pop()
                let a = try pop()
                stack.append(.value(.array([a, b2])))
            case 0x87:
                let c = try pop()
                let b2 = try pop()
                let a = try pop()
                stack.append(.value(.array([a, b2, c])))
            case UInt8(ascii: "d"):
                let items = try popMark()
                guard items.count % 2 == 0 else { throw bad("odd DICT") }
                var o = JSONObject()
                for k in stride(from: 0, to: items.count, by: 2) { o.pairs.append((key(items[k]), items[k + 1])) }
                stack.append(.value(.object(o)))
            case UInt8(ascii: "a"):
                let v = try pop()
                guard case .value(.array(var a))? = stack.popLast() else { throw bad("APPEND to non-list") }
                a.append(v)
                stack.append(.value(.array(a)))
            case UInt8(ascii: "e"):
                let items = try popMark()
                guard case .value(.array(var a))? = stack.popLast() else { throw bad("APPENDS to non-list") }
                a.append(contentsOf: items)
                stack.append(.value(.array(a)))
            case UInt8(ascii: "s"):
                let v = try pop()
                let k = try pop()
                guard case .value(.object(var o))? = stack.popLast() else { throw bad("SETITEM on non-dict") }
                o[key(k)] = v
                stack.append(.value(.object(o)))
            case UInt8(ascii: "u"):
                let items = try popMark()
                guard items.count % 2 == 0 else { throw bad("odd SETITEMS") }
                guard case .value(.object(var o))? = stack.popLast() else { throw bad("SETITEMS on non-dict") }
                for k in stride(from: 0, to: items.count, by: 2) { o[key(items[k])] = items[k + 1] }
                stack.append(.value(.object(o)))
            case UInt8(ascii: "0"): _ = stack.popLast()
            case UInt8(ascii: "1"): _ = try popMark()
            case UInt8(ascii: "2"):
                guard let top = stack.last else { throw bad("DUP on empty stack") }
                stack.append(top)
            // Memo. Values are copied, not shared: fine for trees, which is all JSON can be.
            case UInt8(ascii: "q"):
                let n = Int(try le(1))
                if case .value(let v)? = stack.last { memo[n] = v }
            case UInt8(ascii: "r"):
                let n = Int(try le(4))
                if case .value(let v)? = stack.last { memo[n] = v }
            case 0x94: if case .value(let v)? = stack.last { memo[memo.count] = v }
            case UInt8(ascii: "p"):
                guard let n = Int(try line()) else { throw bad("bad PUT") }
                if case .value(let v)? = stack.last { memo[n] = v }
            case UInt8(ascii: "h"), UInt8(ascii: "j"), UInt8(ascii: "g"):
                let n: Int
                if op == UInt8(ascii: "h") {
                    n = Int(try le(1))
                } else if op == UInt8(ascii: "j") {
                    n = Int(try le(4))
                } else {
                    guard let x = Int(try line()) else { throw bad("bad GET") }
                    n = x
                }
                guard let v = memo[n] else { throw bad("GET of unknown memo \(n)") }
                stack.append(.value(v))
            case UInt8(ascii: "c"): throw bad("GLOBAL imports code; refusing")
            case 0x93: throw bad("STACK_GLOBAL imports code; refusing")
            case UInt8(ascii: "R"): throw bad("REDUCE calls code; refusing")
            case UInt8(ascii: "b"): throw bad("BUILD calls code; refusing")
            case UInt8(ascii: "i"): throw bad("INST imports and calls code; refusing")
            case UInt8(ascii: "o"): throw bad("OBJ calls code; refusing")
            case 0x81: throw bad("NEWOBJ calls code; refusing")
            case 0x92: throw bad("NEWOBJ_EX calls code; refusing")
            case 0x82, 0x83, 0x84: throw bad("EXT imports code; refusing")
            case UInt8(ascii: "P"), UInt8(ascii: "Q"): throw bad("persistent ids are not supported; refusing")
            default: throw bad("opcode 0x\(String(op, radix: 16)) is not in the safe subset")
            }
        }
        throw bad("no STOP")
    }

    private static func pow2(_ n: Int) -> Double {
        var d = 1.0
        for _ in 0..<n { d *= 2 }
        return d
    }
}
