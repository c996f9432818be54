/// A Lua script run by SHA-1 with EVALSHA; the SHA is computed locally so no round trip is needed to learn it.
public struct RedisScript: Sendable, Hashable {
    /// A short name for logs and error messages.
    public let name: String
    /// The Lua source.
    public let source: String
    /// Lowercase hex SHA-1 of the UTF-8 source, as `SCRIPT LOAD` answers it.
    public let sha1: String

    /// Makes a script and computes its SHA-1.
    public init(name: String, source: String) {
        self.name = name
        self.source = source
        self.sha1 = SHA1.hex(Array(source.utf8))
    }
}

/// The server's clock, as `TIME` answers it.
public struct RedisTime: Sendable, Hashable {
    /// Whole seconds since the Unix epoch.
    public var seconds: Int64
    /// Microseconds within the second.
    public var microseconds: Int64
    /// Milliseconds since the Unix epoch.
    public var milliseconds: Int64 { seconds * 1000 + microseconds / 1000 }

    /// Makes a time from TIME's two fields.
    public init(seconds: Int64, microseconds: Int64) {
        self.seconds = seconds
        self.microseconds = microseconds
    }
}

/// SHA-1 (FIPS 180-4), only to name scripts the way Redis does; not for security.
public enum SHA1 {
    /// The 20-byte digest.
    public static func digest(_ message: [UInt8]) -> [UInt8] {
        var h0: UInt32 = 0x6745_2301
        var h1: UInt32 = 0xEFCD_AB89
        var h2: UInt32 = 0x98BA_DCFE
        var h3: UInt32 = 0x1032_5476
        var h4: UInt32 = 0xC3D2_E1F0
        var msg = message
        let bitLength = UInt64(message.count) &* 8
        msg.append(0x80)
        while msg.count % 64 != 56 { msg.append(0) }
        for i in (0..<8).reversed() { msg.append(UInt8(truncatingIfNeeded: bitLength >> (UInt64(i) * 8))) }
        var w = [UInt32](repeating: 0, count: 80)
        for chunk in stride(from: 0, to: msg.count, by: 64) {
            for i in 0..<16 {
                let b = chunk + i * 4
                w[i] = UInt32(msg[b]) << 24 | UInt32(msg[b + 1]) << 16 | UInt32(msg[b + 2]) << 8 | UInt32(msg[b + 3])
            }
            for i in 16..<80 {
                let x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]
                w[i] = x << 1 | x >> 31
            }
            var a = h0, b = h1, c = h2, d = h3, e = h4
            for i in 0..<80 {
                let f: UInt32
                let k: UInt32
                switch i {
                case 0..<20: f = (b & c) | (~b & d); k = 0x5A82_7999
                case 20..<40: f = b ^ c ^ d; k = 0x6ED9_EBA1
                case 40..<60: f = (b & c) | (b & d) | (c & d); k = 0x8F1B_BCDC
                default: f = b ^ c ^ d; k = 0xCA62_C1D6
                }
                let t = (a << 5 | a >> 27) &+ f &+ e &+ k &+ w[i]
                e = d
                d = c
                c = b << 30 | b >> 2
                b = a
                a = t
            }
            h0 = h0 &+ a
            h1 = h1 &+ b
            h2 = h2 &+ c
            h3 = h3 &+ d
            h4 = h4 &+ e
        }
        var out: [UInt8] = []
        for h in [h0, h1, h2, h3, h4] {
            out += [UInt8(h >> 24), UInt8(truncatingIfNeeded: h >> 16), UInt8(truncatingIfNeeded: h >> 8), UInt8(truncatingIfNeeded: h)]
        }
        return out
    }

    /// The digest as 40 lowercase hex digits.
    public static func hex(_ message: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var s: [UInt8] = []
        for byte in digest(message) {
            s.append(digits[Int(byte >> 4)])
            s.append(digits[Int(byte & 0xF)])
        }
        return String(decoding: s, as: UTF8.self)
    }
}
