import Foundation
import Redis
import Testing
import TestSupport
import Worker

/// `rediss://` against a real redis-server with a TLS port (certificates made by `openssl` per suite). The TLS
/// port speaks nothing but TLS, so a command answered there went through TLS.
@Suite("Redis over TLS against a real redis-server")
struct RedisTLSTests {
    static let certificates = Result { try TLSCertificates.make() }

    func startTLSRedis(requireClientCertificates: Bool = false) async throws -> (RedisServer, TLSCertificates) {
        let certs = try Self.certificates.get()
        let server = try await offPool { try RedisServer.startTLS(certs, requireClientCertificates: requireClientCertificates) }
        return (server, certs)
    }

    /// Every kind of call a worker makes, on a connection thread and on the worker's loop: replies of every type,
    /// pipelines, 50 calls at once, and values far larger than a TLS record and a socket buffer (a write that
    /// does not fit waits for the socket; a reply arrives over many records).
    @Test(arguments: Driver.allCases) func commandsPipelinesAndLargeValues(driver: Driver) async throws {
        let (server, certs) = try await startTLSRedis()
        let client = try redisClient(server.tlsURL(certs), driver: driver)
        defer { client.close() }
        try await client.connect()
        #expect(try await client.send(["SET", "k", "v"]) == .simpleString("OK"))
        #expect(try await client.send(["GET", "k"]) == .bulk(Array("v".utf8)))
        let nested = try await client.send(["EVAL", "return {1, {'x', 2}, redis.status_reply('FINE')}", "0"])
        #expect(nested == .array([.integer(1), .array([.bulk([120]), .integer(2)]), .simpleString("FINE")]))
        let pipelined = try await client.pipeline([["SET", "a", "1"], ["INCR", "a"], ["LPUSH", "a", "x"], ["PING"]])
        #expect(pipelined.count == 4)
        #expect(pipelined[1] == .integer(2))
        #expect(pipelined[2].isError(endingWith: "value") || pipelined[2].isError(endingWith: "of value"))
        #expect(pipelined[3] == .simpleString("PONG"))

        let counts = try await withThrowingTaskGroup(of: Int64.self) { group in
            for i in 0..<50 {
                group.addTask(executorPreference: i.isMultiple(of: 2) ? WorkerLoop.shared : nil) {
                    try await client.send(["INCR", "counter"]).int ?? -1
                }
            }
            var all: [Int64] = []
            for try await r in group { all.append(r) }
            return all
        }
        #expect(Set(counts) == Set(1...50))

        let big = (0..<3).map { i -> [UInt8] in
            var v = [UInt8](repeating: UInt8(i + 1), count: 3 << 20)
            for at in [0, 16_383, 16_384, 1 << 20, (3 << 20) - 1] { v[at] = UInt8(200 + i) }
            return v
        }
        for (i, value) in big.enumerated() { _ = try await client.send(bytes: [Array("SET".utf8), Array("big:\(i)".utf8), value]) }
        let back = try await client.pipeline((0..<3).map { ["GET", "big:\($0)"] })
        #expect(back.map(\.bytes) == big.map { Optional($0) })

        // the same port refuses a plain client: what answered above spoke TLS
        let plain = try redisClient("redis://127.0.0.1:\(server.tlsPort!)/0", commandTimeout: .seconds(2), driver: driver)
        defer { plain.close() }
        #expect(await redisError { _ = try await plain.send(["PING"]) } != nil)
    }

    /// A server certificate no trusted CA signed is refused, and the message says which setting to fix;
    /// `ssl_cert_reqs=none` accepts it (as redis-py does).
    @Test func untrustedCertificateIsRefusedUnlessVerificationIsOff() async throws {
        let (server, certs) = try await startTLSRedis()
        let url = "rediss://127.0.0.1:\(server.tlsPort!)/0?ssl_cert_reqs=required&ssl_ca_certs=\(certs.otherCAFile)"
        let client = try redisClient(url, commandTimeout: .seconds(5))
        defer { client.close() }
        let err = await redisError { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("certificate was not accepted") == true, "\(err?.message ?? "no error")")
        #expect(err?.message.contains(certs.otherCAFile) == true)

        let unverified = try redisClient("rediss://127.0.0.1:\(server.tlsPort!)/0?ssl_cert_reqs=none")
        defer { unverified.close() }
        #expect(try await unverified.send(["PING"]) == .simpleString("PONG"))
    }

    /// The certificate names 127.0.0.1 only: connecting as `localhost` is a name mismatch, said plainly;
    /// `ssl_check_hostname=false` turns the check off.
    @Test func hostnameIsChecked() async throws {
        let (server, certs) = try await startTLSRedis()
        let base = "rediss://localhost:\(server.tlsPort!)/0?ssl_cert_reqs=required&ssl_ca_certs=\(certs.caFile)"
        let client = try redisClient(base, commandTimeout: .seconds(5))
        defer { client.close() }
        let err = await redisError { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("mismatch") == true, "\(err?.message ?? "no error")")
        #expect(err?.message.contains("ssl_check_hostname=false") == true)

        let unchecked = try redisClient(base + "&ssl_check_hostname=false")
        defer { unchecked.close() }
        #expect(try await unchecked.send(["PING"]) == .simpleString("PONG"))
    }

    /// A Redis that requires client certificates (`tls-auth-clients yes`): without one the connection is refused
    /// with a message naming ssl_certfile; with the CA-signed one it works.
    @Test func clientCertificate() async throws {
        let (server, certs) = try await startTLSRedis(requireClientCertificates: true)
        let without = try redisClient(server.tlsURL(certs), commandTimeout: .seconds(5))
        defer { without.close() }
        let err = await redisError { _ = try await without.send(["PING"]) }
        #expect(err != nil)
        #expect(err?.message.contains("ssl_certfile") == true, "\(err?.message ?? "no error")")

        let with = try redisClient(server.tlsURL(certs, query: "ssl_certfile=\(certs.clientCert)&ssl_keyfile=\(certs.clientKey)"))
        defer { with.close() }
        #expect(try await with.send(["PING"]) == .simpleString("PONG"))

        let missing = try redisClient(server.tlsURL(certs, query: "ssl_certfile=/nonexistent/client.crt"))
        defer { missing.close() }
        let fileErr = await redisError { try await missing.connect() }
        #expect(fileErr?.message.contains("cannot load the client certificate /nonexistent/client.crt") == true,
                "\(fileErr?.message ?? "no error")")
    }

    /// redis-py's other file settings: `ssl_ca_path` (a hashed CA directory) and `ssl_password` for an encrypted
    /// client key — without the password the key is refused (never a prompt) with the setting to add.
    @Test func caDirectoryAndEncryptedKey() async throws {
        let (server, certs) = try await startTLSRedis(requireClientCertificates: true)
        let base = "rediss://127.0.0.1:\(server.tlsPort!)/0?ssl_cert_reqs=required&ssl_ca_path=\(certs.caDirectory)"
            + "&ssl_certfile=\(certs.clientCert)&ssl_keyfile=\(certs.encryptedClientKey)"
        let noPassword = try redisClient(base, commandTimeout: .seconds(5))
        defer { noPassword.close() }
        let err = await redisError { try await noPassword.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("set ssl_password") == true, "\(err?.message ?? "no error")")

        let withPassword = try redisClient(base + "&ssl_password=\(certs.encryptedKeyPassword)")
        defer { withPassword.close() }
        #expect(try await withPassword.send(["PING"]) == .simpleString("PONG"))
    }

    /// `rediss://` pointed at a plain port fails the handshake and says to use redis:// there.
    @Test func tlsToAPlainPortSaysWhatToDo() async throws {
        let (server, certs) = try await startTLSRedis()
        let client = try redisClient("rediss://127.0.0.1:\(server.port)/0?ssl_ca_certs=\(certs.caFile)", commandTimeout: .seconds(5))
        defer { client.close() }
        let err = await redisError { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("tls-port") == true, "\(err?.message ?? "no error")")
    }

    /// A link that accepts the connection and then drops every byte (a partition): the handshake gives up after
    /// the connect timeout and says so, instead of hanging the connecting thread.
    @Test func partitionedHandshakeGivesUp() async throws {
        let (server, certs) = try await startTLSRedis()
        let link = try FaultProxy(upstreamPort: server.tlsPort!)
        defer { link.stop() }
        link.partition()
        var config = try RedisConfiguration(url: "rediss://127.0.0.1:\(link.port)/0?ssl_cert_reqs=required&ssl_ca_certs=\(certs.caFile)")
        config.connectTimeout = .seconds(1)
        let client = RedisClient(configuration: config, logger: quietLogger)
        defer { client.close() }
        let err = await redisError { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("no answer to the TLS handshake") == true, "\(err?.message ?? "no error")")
        link.heal()
        #expect(try await eventually { try await client.send(["PING"]) == .simpleString("PONG") })
    }

    /// Sentinel with a TLS master, as kombu does it with `broker_use_ssl`: the sentinels are asked in plain, the
    /// master they name is reached over TLS (its TLS port is what they hand out).
    @Test func sentinelNamesATLSMaster() async throws {
        let (master, certs) = try await startTLSRedis()
        let sentinel = try await offPool {
            try RedisServer.startSentinel(masterPort: master.tlsPort!, masterName: "tlsmaster", quorum: 1, tls: certs)
        }
        var config = try RedisConfiguration(url: "sentinel://127.0.0.1:\(sentinel.port)/0", masterName: "tlsmaster")
        var tls = RedisConfiguration.TLS()
        tls.caFile = certs.caFile
        config.tls = tls
        let client = RedisClient(configuration: config, logger: quietLogger)
        defer { client.close() }
        #expect(try await client.send(["SET", "k", "v"]) == .simpleString("OK"))
        let info = try await client.send(["CLIENT", "INFO"]).string ?? ""
        #expect(info.contains("laddr=127.0.0.1:\(master.tlsPort!) "), "\(info)")
    }

    /// A frozen server times out over TLS as over TCP (the socket timeout surfaces through OpenSSL as a timeout,
    /// not an I/O error), and after a restart the next call reconnects with a new handshake.
    @Test(arguments: Driver.allCases) func timeoutAndReconnect(driver: Driver) async throws {
        let (server, certs) = try await startTLSRedis()
        let client = try redisClient(server.tlsURL(certs), commandTimeout: .milliseconds(300), driver: driver)
        defer { client.close() }
        _ = try await sendAllowingSlowMachine(client, ["SET", "k", "1"])
        server.kill(signal: SIGSTOP)
        let err = await redisError { _ = try await client.send(["INCR", "n"]) }
        server.kill(signal: SIGCONT)
        #expect(err?.code == .timeout, "\(err?.message ?? "no error")")
        #expect(try await sendAllowingSlowMachine(client, ["GET", "k"]).string == "1")

        try await offPool { try server.restart() }
        #expect(try await eventually { try await client.send(["PING"]) == .simpleString("PONG") })
    }
    /// Rotating certificates needs no restart of Tandem: the CA bundle is read again on every (re)connect. The
    /// usual overlap rotation — the bundle gains the new CA, Redis switches to a certificate the new CA signed
    /// (`CONFIG SET tls-cert-file`, which applies to new sessions), then the old CA leaves the bundle — with the
    /// client's connections cut after each step, and the same client object carrying on throughout.
    @Test(arguments: Driver.allCases) func rotatedCertificatesAreReadOnReconnect(driver: Driver) async throws {
        let (server, certs) = try await startTLSRedis()
        let bundle = certs.directory + "/rotating-\(driver)-ca.crt"
        let oldCA = try String(contentsOfFile: certs.caFile, encoding: .utf8)
        let newCA = try String(contentsOfFile: certs.otherCAFile, encoding: .utf8)
        try oldCA.write(toFile: bundle, atomically: true, encoding: .utf8)
        let url = "rediss://127.0.0.1:\(server.tlsPort!)/0?ssl_cert_reqs=required&ssl_ca_certs=\(bundle)"
        let client = try redisClient(url, commandTimeout: .seconds(5), driver: driver)
        defer { client.close() }
        let admin = try redisClient(server.url)
        defer { admin.close() }
        #expect(try await client.send(["SET", "k", "before"]) == .simpleString("OK"))

        /// Cuts every TLS client (the admin's own plain connection stays) and waits for `client` to work again.
        func reconnected() async throws -> Bool {
            _ = try await admin.send(["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            return try await eventually { try await client.send(["GET", "k"]).string != nil }
        }
        try (oldCA + newCA).write(toFile: bundle, atomically: true, encoding: .utf8)
        #expect(try await reconnected())
        #expect(try await admin.send(["CONFIG", "SET", "tls-cert-file", certs.otherServerCert,
                                      "tls-key-file", certs.otherServerKey]) == .simpleString("OK"))
        #expect(try await reconnected())
        try newCA.write(toFile: bundle, atomically: true, encoding: .utf8)
        #expect(try await reconnected())
        #expect(try await client.send(["GET", "k"]).string == "before")

        // the server did switch: a client that trusts only the old CA is refused now
        let stale = try redisClient(server.tlsURL(certs), commandTimeout: .seconds(5))
        defer { stale.close() }
        let err = await redisError { try await stale.connect() }
        #expect(err?.message.contains("certificate was not accepted") == true, "\(err?.message ?? "no error")")
    }
}
