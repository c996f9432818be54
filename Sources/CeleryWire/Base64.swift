// Base64 (RFC 4648) without Foundation: kombu bodies are base64 and we decode every one.

private let decodeTable: [UInt8] = {
    var t = [UInt8](repeating: 0xFF, count: 256)
    for (i, c) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8.enumerated() {
        t[Int(c)] = UInt8(i)
    }
    // Python's b64decode also accepts the URL-safe alphabet only when asked; we accept it always.
    t[Int(UInt8(ascii: "-"))] = 62
    t[Int(UInt8(ascii: "_"))] = 63
    return t
}()

private let encodeTable: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

/// Base64 encoding and decoding.
public enum Base64 {
    /// Decodes standard base64; whitespace is skipped, padding optional. Nil on any other character.
    public static func decode<C: Collection>(_ input: C) -> [UInt8]? where C.Element == UInt8 {
        var out = [UInt8]()
        out.reserveCapacity(input.count * 3 / 4)
        var acc: UInt32 = 0
        var n = 0
        var pad = 0
        for c in input {
            if c == UInt8(ascii: "=") {
                pad += 1
                continue
            }
            if c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { continue }
            if pad > 0 { return nil }  // data after padding
            let v = decodeTable[Int(c)]
            if v == 0xFF { return nil }
            acc = acc << 6 | UInt32(v)
            n += 1
            if n == 4 {
                out.append(UInt8(acc >> 16))
                out.append(UInt8((acc >> 8) & 0xFF))
                out.append(UInt8(acc & 0xFF))
                acc = 0
                n = 0
            }
        }
        switch n {
        case 0: break
        case 2: out.append(UInt8(acc >> 4))
        case 3:
            out.append(UInt8(acc >> 10))
            out.append(UInt8((acc >> 2) & 0xFF))
        default: return nil
        }
        return out
    }

    /// Standard base64 with padding.
    public static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= bytes.count {
            let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            out.append(encodeTable[Int(v >> 18)])
            out.append(encodeTable[Int((v >> 12) & 63)])
            out.append(encodeTable[Int((v >> 6) & 63)])
            out.append(encodeTable[Int(v & 63)])
            i += 3
        }
        let rest = bytes.count - i
        if rest == 1 {
            let v = UInt32(bytes[i]) << 16
            out.append(encodeTable[Int(v >> 18)])
            out.append(encodeTable[Int((v >> 12) & 63)])
            out.append(contentsOf: [0x3D, 0x3D])
        } else if rest == 2 {
            let v = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
            out.append(encodeTable[Int(v >> 18)])
            out.append(encodeTable[Int((v >> 12) & 63)])
            out.append(encodeTable[Int((v >> 6) & 63)])
            out.append(0x3D)
        }
        return String(decoding: out, as: UTF8.self)
    }
}
