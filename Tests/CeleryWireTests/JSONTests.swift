import Foundation
import Testing

@testable import CeleryWire

@Suite("JSON")
struct JSONTests {
    @Test func scalarsAndContainers() throws {
        let v = try JSONValue.parse(#" { "a" : [1, -2, 3.5, 1e3, true, false, null, "x"], "b": {} , "c": [] } "#)
        #expect(v["a"] == [1, -2, 3.5, 1000.0, true, false, nil, "x"])
        #expect(v["b"] == .object([:]))
        #expect(v["c"] == .array([]))
        #expect(v.object?.keys == ["a", "b", "c"])
        #expect(v.serialized() == #"{"a":[1,-2,3.5,1000.0,true,false,null,"x"],"b":{},"c":[]}"#)
    }

    @Test func unicodeEscapesAndSurrogatePairs() throws {
        let v = try JSONValue.parse(#""h\u00e9llo \u2603 \ud834\udd1e \n\t\"\\\/""#)
        #expect(v.string == "héllo ☃ 𝄞 \n\t\"\\/")
        #expect(v.serialized(style: .python) == #""h\u00e9llo \u2603 \ud834\udd1e \n\t\"\\/""#)
        #expect(v.serialized() == "\"héllo ☃ 𝄞 \\n\\t\\\"\\\\/\"")
        // Lone surrogates become U+FFFD rather than failing the whole message.
        #expect(try JSONValue.parse(#""\ud834x""#).string == "\u{FFFD}x")
        #expect(try JSONValue.parse(#""\udd1e""#).string == "\u{FFFD}")
        // Raw UTF-8 passes through.
        #expect(try JSONValue.parse("\"日本\"").string == "日本")
    }

    @Test func bigIntsFallBackToDouble() throws {
        #expect(try JSONValue.parse("9223372036854775807") == .int(Int64.max))
        #expect(try JSONValue.parse("-9223372036854775808") == .int(Int64.min))
        #expect(try JSONValue.parse("9223372036854775808") == .double(9223372036854775808.0))
        #expect(try JSONValue.parse("1180591620717411303424") == .double(1180591620717411303424.0))
        #expect(try JSONValue.parse("-0") == .int(0))
    }

    @Test func pythonFloatRepr() {
        #expect(JSONValue.double(1.5e-7).serialized() == "1.5e-07")
        #expect(JSONValue.double(1e16).serialized() == "1e+16")
        #expect(JSONValue.double(240.5).serialized() == "240.5")
        #expect(JSONValue.double(300).serialized() == "300.0")
        #expect(JSONValue.double(1180591620717411303424.0).serialized() == "1.1805916207174113e+21")
    }

    @Test(arguments: [
        "", "{", "[1,]", "{\"a\" 1}", "tru", "01", "1.", "\"abc", "\"\u{01}\"", "[1] x", "\"\\x\"",
        "{1:2}", "\"\\u12g4\"",
    ])
    func malformedIsNotJSON(_ s: String) {
        #expect(throws: WireError.self) { try JSONValue.parse(s) }
        do { _ = try JSONValue.parse(s) } catch { #expect(error.code == .notJSON) }
    }

    @Test func deepNestingIsRefused() {
        let s = String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000)
        #expect(throws: WireError.self) { try JSONValue.parse(s) }
    }

    @Test func objectEqualityIgnoresOrderButSerializationKeepsIt() throws {
        let a = try JSONValue.parse(#"{"x":1,"y":2}"#)
        let b = try JSONValue.parse(#"{"y":2,"x":1}"#)
        #expect(a == b)
        #expect(a.hashValue == b.hashValue)
        #expect(b.serialized() == #"{"y":2,"x":1}"#)
        var o = a.object!
        o["z"] = 3
        o["x"] = nil
        #expect(JSONValue.object(o).serialized() == #"{"y":2,"z":3}"#)
    }

    @Test func bytesAndStringParseAgree() throws {
        for v in Vector.tasks.prefix(10) {
            #expect(try JSONValue.parse(Array(v.raw.utf8)) == JSONValue.parse(v.raw))
        }
    }

    @Test func base64() {
        for n in 0..<20 {
            let bytes = (0..<n).map { UInt8(($0 * 37 + 11) & 0xFF) }
            let enc = Base64.encode(bytes)
            #expect(Base64.decode(enc.utf8) == bytes)
            #expect(enc == Data(bytes).base64EncodedString())
        }
        #expect(Base64.decode("a$==".utf8) == nil)
        #expect(Base64.decode("a".utf8) == nil)
        #expect(Base64.decode("YQ==YQ==".utf8) == nil)
    }

    @Test func dates() throws {
        let d = try #require(CeleryDate.parse("2030-01-02T03:04:05.678901+00:00"))
        #expect(abs(d.timeIntervalSince1970 - 1893553445.678901) < 1e-6)
        #expect(CeleryDate.isoformat(d) == "2030-01-02T03:04:05.678901+00:00")
        #expect(CeleryDate.parse("2030-01-03T00:00:00+02:00")?.timeIntervalSince1970 == 1_893_621_600)
        #expect(CeleryDate.parse("2030-01-02T22:00:00")?.timeIntervalSince1970 == 1_893_621_600)  // naive = UTC
        #expect(CeleryDate.parse("2030-01-02T22:00:00Z")?.timeIntervalSince1970 == 1_893_621_600)
        #expect(CeleryDate.parse("2030-01-02 22:00:00.5-0130")?.timeIntervalSince1970 == 1893621600.5 + 5400)
        #expect(CeleryDate.parse("2030-01-02")?.timeIntervalSince1970 == 1_893_542_400)
        #expect(CeleryDate.isoformat(Date(timeIntervalSince1970: 1_893_621_600)) == "2030-01-02T22:00:00+00:00")
        #expect(CeleryDate.isoformat(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00+00:00")
        #expect(CeleryDate.isoformat(Date(timeIntervalSince1970: 951_782_400)) == "2000-02-29T00:00:00+00:00")
        for bad in ["", "2030", "2030-13-01", "2030-01-02T25:00:00", "2030-01-02T03:04:05+xx", "2030-01-02T03"] {
            #expect(CeleryDate.parse(bad) == nil, "\(bad)")
        }
    }
}
