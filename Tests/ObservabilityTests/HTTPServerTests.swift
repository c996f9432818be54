import Foundation
import HTTPServer
import Logging
import Testing

@Suite("HTTP server on real sockets")
struct HTTPServerTests {
    let server: HTTPServer

    init() throws {
        server = HTTPServer(
            host: "127.0.0.1", port: 0,
            routes: [
                "/metrics": { _ in .text("m 1\n") },
                "/log": { req in
                    guard req.headers["authorization"] == "Bearer t" else { return .text("forbidden\n", status: 403) }
                    return .text("path=\(req.path) q=\(req.query["offset"] ?? "-")\n")
                },
            ],
            logger: Logger(label: "test"))
        try server.start()
    }

    @Test("binds an ephemeral port and serves a route, closing the connection")
    func servesRoute() async throws {
        #expect(server.port > 0)
        let r = try await get(port: server.port, "/metrics")
        #expect(r.status == 200)
        #expect(r.body == "m 1\n")
        #expect(r.head.contains("Connection: close"))
        #expect(r.head.contains("Content-Length: 4"))
        server.stop()
    }

    @Test("prefix routes match whole segments; path and query are decoded; headers reach the handler")
    func prefixRoutesAndHeaders() async throws {
        let ok = try await get(port: server.port, "/log/dag_id%3Dx/run%201.log?offset=10&x=y", headers: ["Authorization: Bearer t"])
        #expect(ok.status == 200)
        #expect(ok.body == "path=/log/dag_id=x/run 1.log q=10\n")
        #expect(try await get(port: server.port, "/log/a").status == 403)
        #expect(try await get(port: server.port, "/logs").status == 404)
        #expect(try await get(port: server.port, "/").status == 404)
        server.stop()
    }

    @Test("refuses what it does not serve: POST 405, a head over 8 KB 431, garbage 400; HEAD has no body")
    func refusals() async throws {
        let post = try await rawExchange(port: server.port, Array("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n".utf8))
        #expect(post.status == 405)
        let big = "GET /metrics HTTP/1.1\r\nX-Big: " + String(repeating: "a", count: 9000) + "\r\n\r\n"
        #expect(try await rawExchange(port: server.port, Array(big.utf8)).status == 431)
        #expect(try await rawExchange(port: server.port, Array("hello\r\n\r\n".utf8)).status == 400)
        let head = try await rawExchange(port: server.port, Array("HEAD /metrics HTTP/1.1\r\n\r\n".utf8))
        #expect(head.status == 200)
        #expect(head.body.isEmpty)
        server.stop()
    }

    @Test("stop() closes the port; binding a port in use fails with a message naming it")
    func stopAndPortInUse() async throws {
        let other = HTTPServer(host: "127.0.0.1", port: server.port, routes: [:], logger: Logger(label: "test"))
        #expect(throws: HTTPServerError.self) { try other.start() }
        let p = server.port
        server.stop()
        try await Task.sleep(for: .milliseconds(100))
        await #expect(throws: (any Error).self) { _ = try await get(port: p, "/metrics") }
    }
}
