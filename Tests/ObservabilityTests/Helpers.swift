#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TestSupport

/// A raw HTTP exchange over a socket: what a probe or Prometheus sends, byte for byte.
struct RawHTTP {
    var status: Int
    var head: String
    var body: String
}

/// Sends `request` bytes to 127.0.0.1:`port` and reads until the server closes (it always does: Connection: close).
func rawExchange(port: Int, _ request: [UInt8]) async throws -> RawHTTP {
    try await offPool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket failed") }
        defer { close(fd) }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { throw TestSupportError("cannot connect to 127.0.0.1:\(port): \(String(cString: strerror(errno)))") }
        var off = 0
        while off < request.count {
            let n = request.withUnsafeBytes { send(fd, $0.baseAddress! + off, request.count - off, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }  // the server may answer (431) and close before reading everything
            off += n
        }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        let text = String(decoding: out, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { throw TestSupportError("no HTTP head in reply: \(text)") }
        let head = String(text[..<split.lowerBound])
        let status = Int(head.split(separator: " ").dropFirst().first ?? "") ?? 0
        return RawHTTP(status: status, head: head, body: String(text[split.upperBound...]))
    }
}

func get(port: Int, _ path: String, headers: [String] = []) async throws -> RawHTTP {
    let req = "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers.map { $0 + "\r\n" }.joined() + "\r\n"
    return try await rawExchange(port: port, Array(req.utf8))
}

/// One sample's value from Prometheus text: `name{labels}`, labels matched exactly (all of them).
func sample(_ text: String, _ name: String, _ labels: [String: String] = [:]) -> Double? {
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " ") else { continue }
        let series = line[..<space]
        let value = Double(line[line.index(after: space)...])
        var seriesName = String(series)
        var got: [String: String] = [:]
        if let brace = series.firstIndex(of: "{") {
            seriesName = String(series[..<brace])
            let inner = series[series.index(after: brace)..<series.index(before: series.endIndex)]
            for pair in inner.split(separator: ",") {
                let kv = pair.split(separator: "=", maxSplits: 1)
                if kv.count == 2 { got[String(kv[0])] = String(kv[1].dropFirst().dropLast()) }
            }
        }
        if seriesName == name && got == labels { return value }
    }
    return nil
}

/// Sum of every sample of `name` whose labels include `match`.
func total(_ text: String, _ name: String, where match: [String: String] = [:]) -> Double {
    var sum = 0.0
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let v = Double(line[line.index(after: space)...]) else { continue }
        let series = String(line[..<space])
        let n = series.firstIndex(of: "{").map { String(series[..<$0]) } ?? series
        guard n == name else { continue }
        if match.allSatisfy({ series.contains("\($0.key)=\"\($0.value)\"") }) { sum += v }
    }
    return sum
}
