// DEFLATE decoder (RFC 1951) with zlib (RFC 1950) and gzip (RFC 1952) wrappers, in pure Swift.
//
// Why: kombu's "gzip" and "zlib" compression are both `zlib.compress` (content type
// `application/x-gzip`), and CeleryWire may not link a C library. Bodies are small (kilobytes), so this
// favours clarity (puff-style canonical Huffman decoding) over speed.

enum Inflate {
    /// Refuse to inflate beyond this: a compressed task body has no business being larger.
    static let maxOutput = 64 << 20

    /// Decompresses a zlib stream, a gzip member, or (failing both headers) raw deflate data.
    static func decompress(_ data: [UInt8]) throws(WireError) -> [UInt8] {
        if data.count >= 2, data[0] & 0x0F == 8, (UInt16(data[0]) << 8 | UInt16(data[1])) % 31 == 0 {
            if data[1] & 0x20 != 0 { throw corrupt("zlib stream needs a preset dictionary") }
            return try inflate(data, from: 2)
        }
        if data.count >= 10, data[0] == 0x1F, data[1] == 0x8B, data[2] == 8 {
            let flags = data[3]
            var p = 10
            if flags & 0x04 != 0 {  // FEXTRA
                guard p + 2 <= data.count else { throw corrupt("truncated gzip header") }
                p += 2 + (Int(data[p]) | Int(data[p + 1]) << 8)
            }
            if flags & 0x08 != 0 {
                while p < data.count && data[p] != 0 { p += 1 }
                p += 1
            }  // FNAME
            if flags & 0x10 != 0 {
                while p < data.count && data[p] != 0 { p += 1 }
                p += 1
            }  // FCOMMENT
            if flags & 0x02 != 0 { p += 2 }  // FHCRC
            guard p <= data.count else { throw corrupt("truncated gzip header") }
            return try inflate(data, from: p)
        }
        return try inflate(data, from: 0)
    }

    static func corrupt(_ why: String) -> WireError {
        WireError(.unsupportedCompression, "compressed body is corrupt (\(why)); was it truncated in transit?")
    }

    struct Huffman {
        var count = [Int](repeating: 0, count: 16)
        var symbol: [Int]

        init(lengths: ArraySlice<Int>) throws(WireError) {
            symbol = [Int](repeating: 0, count: lengths.count)
            for l in lengths { count[l] += 1 }
            count[0] = 0
            var offs = [Int](repeating: 0, count: 16)
            for len in 1..<15 { offs[len + 1] = offs[len] + count[len] }
            for (sym, l) in lengths.enumerated() where l != 0 {
                symbol[offs[l]] = sym
                offs[l] += 1
            }
        }
    }

    struct State {
        let data: [UInt8]
        var pos: Int
        var bitBuf: UInt32 = 0
        var bitCnt: UInt32 = 0
        var out: [UInt8] = []

        mutating func bits(_ n: UInt32) throws(WireError) -> Int {
            while bitCnt < n {
                guard pos < data.count else { throw Inflate.corrupt("ran out of input") }
                bitBuf |= UInt32(data[pos]) << bitCnt
                pos += 1
                bitCnt += 8
            }
            let v = bitBuf & ((1 << n) - 1)
            bitBuf >>= n
            bitCnt -= n
            return Int(v)
        }

        mutating func decode(_ h: Huffman) throws(WireError) -> Int {
            var code = 0
            var first = 0
            var index = 0
            for len in 1..<16 {
                code |= try bits(1)
                let count = h.count[len]
                if code - count < first { return h.symbol[index + (code - first)] }
                index += count
                first += count
                first <<= 1
                code <<= 1
            }
            throw Inflate.corrupt("bad Huffman code")
        }
    }

    static let lengthBase = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
        115, 131, 163, 195, 227, 258,
    ]
    static let lengthExtra: [UInt32] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5,
        5, 5, 5, 0,
    ]
    static let distBase = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
        1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ]
    static let distExtra: [UInt32] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11,
        11, 12, 12, 13, 13,
    ]
    static let order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]

    static let fixed: (Huffman, Huffman) = {
        var l = [Int](repeating: 8, count: 288)
        for i in 144..<256 { l[i] = 9 }
        for i in 256..<280 { l[i] = 7 }
        let lit = try! Huffman(lengths: l[...])
        let dist = try! Huffman(lengths: [Int](repeating: 5, count: 30)[...])
        return (lit, dist)
    }()

    static func inflate(_ data: [UInt8], from start: Int) throws(WireError) -> [UInt8] {
        var s = State(data: data, pos: start)
        s.out.reserveCapacity(data.count * 4)
        var last = 0
        repeat {
            last = try s.bits(1)
            switch try s.bits(2) {
            case 0:
                s.bitBuf = 0
                s.bitCnt = 0
                guard s.pos + 4 <= data.count else { throw corrupt("truncated stored block") }
                let len = Int(data[s.pos]) | Int(data[s.pos + 1]) << 8
                let nlen = Int(data[s.pos + 2]) | Int(data[s.pos + 3]) << 8
                guard len == ~nlen & 0xFFFF else { throw corrupt("stored block length check failed") }
                s.pos += 4
                guard s.pos + len <= data.count else { throw corrupt("truncated stored block") }
                s.out.append(contentsOf: data[s.pos..<s.pos + len])
                s.pos += len
            case 1:
                try codes(&s, fixed.0, fixed.1)
            case 2:
                let nlen = try s.bits(5) + 257
                let ndist = try s.bits(5) + 1
                let ncode = try s.bits(4) + 4
                guard nlen <= 286, ndist <= 30 else { throw corrupt("bad dynamic block header") }
                var lengths = [Int](repeating: 0, count: 320)
                for i in 0..<ncode { lengths[order[i]] = try s.bits(3) }
                let lencode = try Huffman(lengths: lengths[0..<19])
                var i = 0
                while i < nlen + ndist {
                    var sym = try s.decode(lencode)
                    if sym < 16 {
                        lengths[i] = sym
                        i += 1
                        continue
                    }
                    var len = 0
                    if sym == 16 {
                        guard i > 0 else { throw corrupt("repeat with no previous length") }
                        len = lengths[i - 1]
                        sym = 3 + (try s.bits(2))
                    } else if sym == 17 {
                        sym = 3 + (try s.bits(3))
                    } else {
                        sym = 11 + (try s.bits(7))
                    }
                    guard i + sym <= nlen + ndist else { throw corrupt("too many lengths") }
                    for _ in 0..<sym {
                        lengths[i] = len
                        i += 1
                    }
                }
                guard lengths[256] != 0 else { throw corrupt("no end-of-block code") }
                let lit = try Huffman(lengths: lengths[0..<nlen])
                let dist = try Huffman(lengths: lengths[nlen..<nlen + ndist])
                try codes(&s, lit, dist)
            default:
                throw corrupt("invalid block type")
            }
        } while last == 0
        return s.out
    }

    static func codes(_ s: inout State, _ lit: Huffman, _ dist: Huffman) throws(WireError) {
        while true {
            var sym = try s.decode(lit)
            if sym < 256 {
                s.out.append(UInt8(sym))
            } else if sym == 256 {
                return
            } else {
                sym -= 257
                guard sym < 29 else { throw corrupt("bad length symbol") }
                let len = lengthBase[sym] + (try s.bits(lengthExtra[sym]))
                let dsym = try s.decode(dist)
                guard dsym < 30 else { throw corrupt("bad distance symbol") }
                let d = distBase[dsym] + (try s.bits(distExtra[dsym]))
                guard d <= s.out.count else { throw corrupt("distance too far back") }
                guard s.out.count + len <= maxOutput else {
                    throw WireError(.unsupportedCompression, "compressed body inflates past \(maxOutput) bytes")
                }
                let from = s.out.count - d
                for k in 0..<len { s.out.append(s.out[from + k]) }
            }
            if s.out.count > maxOutput {
                throw WireError(.unsupportedCompression, "compressed body inflates past \(maxOutput) bytes")
            }
        }
    }
}
