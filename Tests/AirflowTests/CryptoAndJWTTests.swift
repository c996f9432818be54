import Foundation
import HTTPServer
import Logging
import LogServer
import Testing

@Suite("SHA-512 and HMAC-SHA512")
struct SHA512Tests {
    static func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }

    @Test func fipsVectors() {
        #expect(Self.hex(SHA512.hash(Array("abc".utf8))) == "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
        #expect(Self.hex(SHA512.hash([])) == "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e")
        // two-block message (FIPS 180-2 appendix C.2)
        let m = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"
        #expect(Self.hex(SHA512.hash(Array(m.utf8))) == "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")
    }

    @Test func rfc4231() {
        // test case 2
        #expect(Self.hex(SHA512.hmac(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))) == "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737")
        // test case 6: a key longer than the block size
        let key = [UInt8](repeating: 0xaa, count: 131)
        #expect(Self.hex(SHA512.hmac(key: key, message: Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8))) == "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598")
    }

    @Test("agrees with Python's hmac on many lengths")
    func agreesWithPython() throws {
        var cases: [(key: [UInt8], msg: [UInt8])] = []
        var rng = SystemRandomNumberGenerator()
        for len in [0, 1, 55, 111, 112, 127, 128, 129, 239, 240, 255, 256, 1000, 4097] {
            let key = (0..<(len % 200)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            cases.append((key, (0..<len).map { _ in UInt8.random(in: 0...255, using: &rng) }))
        }
        let input = cases.map { "\(SHA512Tests.hex($0.key)) \(SHA512Tests.hex($0.msg))" }.joined(separator: "\n")
        let out = try AF.run(
            """
            import hmac, hashlib, sys
            for line in sys.stdin.read().splitlines():
                k, m = (line.split(" ") + [""])[:2]
                print(hmac.new(bytes.fromhex(k), bytes.fromhex(m), hashlib.sha512).hexdigest())
            """, stdin: input)
        #expect(out.status == 0, "\(out.stderr)")
        let lines = out.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == cases.count)
        for (c, line) in zip(cases, lines) { #expect(Self.hex(SHA512.hmac(key: c.key, message: c.msg)) == line) }
    }
}

@Suite("log server")
struct LogServerTests {
    static let secret = "tandem-test-secret-key"

    /// Tokens from Airflow's own JWTGenerator (as the API server signs them) and from PyJWT directly, and the clock
    /// they were signed against (a check made at that instant does not depend on how slowly Python started).
    static func airflowTokens(_ specs: [String]) throws -> (tokens: [String], signedAt: Date) {
        let out = try AF.run(
            """
            import sys, time, jwt
            from airflow.api_fastapi.auth.tokens import JWTGenerator
            secret = sys.argv[1]
            def gen(key=secret, valid_for=30, aud="task-instance-logs"):
                return JWTGenerator(secret_key=key, algorithm="HS512", private_key=None, issuer=None,
                                    valid_for=valid_for, audience=aud)
            now = int(time.time())
            print("SIGNED_AT", now)
            for spec in sys.argv[2:]:
                kind, fn = spec.split("|", 1)
                if kind == "airflow": tok = gen().generate({"filename": fn})
                elif kind == "wrongkey": tok = gen(key="another-key").generate({"filename": fn})
                elif kind == "wrongaud": tok = gen(aud="something-else").generate({"filename": fn})
                elif kind == "pyjwt": tok = jwt.encode({"filename": fn, "aud": "task-instance-logs", "iat": now, "nbf": now, "exp": now + 30}, secret, algorithm="HS512")
                elif kind == "expired": tok = jwt.encode({"filename": fn, "aud": "task-instance-logs", "iat": now - 200, "nbf": now - 200, "exp": now - 100}, secret, algorithm="HS512")
                elif kind == "graced": tok = jwt.encode({"filename": fn, "aud": "task-instance-logs", "iat": now - 40, "nbf": now - 40, "exp": now - 10}, secret, algorithm="HS512")
                elif kind == "hs256": tok = jwt.encode({"filename": fn, "aud": "task-instance-logs", "iat": now, "nbf": now, "exp": now + 30}, secret, algorithm="HS256")
                elif kind == "noexp": tok = jwt.encode({"filename": fn, "aud": "task-instance-logs", "iat": now, "nbf": now}, secret, algorithm="HS512")
                print("TOKEN", tok)
            """, args: [secret] + specs)
        guard out.status == 0 else { throw LogTestError(out.stderr) }
        let lines = out.stdout.split(separator: "\n")
        guard let at = lines.first(where: { $0.hasPrefix("SIGNED_AT ") }).flatMap({ Double($0.dropFirst(10)) }) else {
            throw LogTestError("no SIGNED_AT line from the token script: \(out.stdout)")
        }
        return (lines.filter { $0.hasPrefix("TOKEN ") }.map { String($0.dropFirst(6)) }, Date(timeIntervalSince1970: at))
    }

    struct LogTestError: Error { var s: String; init(_ s: String) { self.s = s } }

    static func folder() throws -> String {
        let base = AF.tempDir("tandem-logs")
        let dir = base + "/dag_id=demo/run_id=r1/task_id=t1"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "hello from attempt 1\n".write(toFile: dir + "/attempt=1.log", atomically: true, encoding: .utf8)
        let outside = AF.tempDir("tandem-secret")
        try "secret\n".write(toFile: outside + "/passwd", atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: base + "/escape", withDestinationPath: outside)
        try FileManager.default.createSymbolicLink(atPath: dir + "/link.log", withDestinationPath: outside + "/passwd")
        return base
    }

    @Test("tokens signed by Airflow and PyJWT: accepted, refused, clock grace, path containment")
    func decisions() throws {
        let base = try Self.folder()
        let path = "dag_id=demo/run_id=r1/task_id=t1/attempt=1.log"
        let (toks, signedAt) = try Self.airflowTokens([
            "airflow|\(path)", "pyjwt|\(path)", "wrongkey|\(path)", "wrongaud|\(path)", "expired|\(path)",
            "graced|\(path)", "hs256|\(path)", "noexp|\(path)", "airflow|other.log", "airflow|../x",
            "airflow|escape/passwd", "airflow|dag_id=demo/run_id=r1/task_id=t1/link.log", "airflow|dag_id=demo/missing.log",
        ])
        let v = JWTVerifier(secretKey: Self.secret)
        func status(_ tok: String?, _ p: String) -> Int {
            var h: [String: String] = [:]
            if let tok { h["authorization"] = tok }
            return LogServer.respond(
                HTTPRequest(method: "GET", path: "/log/" + p, headers: h), base: base, verifier: v, logger: AF.logger, now: signedAt
            ).status
        }
        #expect(status(toks[0], path) == 200)
        #expect(status("Bearer " + toks[0], path) == 200)
        #expect(status(toks[1], path) == 200)
        #expect(status(toks[2], path) == 403, "wrong key")
        #expect(status(toks[3], path) == 403, "wrong audience")
        #expect(status(toks[4], path) == 403, "expired beyond the grace")
        #expect(status(toks[5], path) == 200, "expired 10 s ago: inside the 30 s grace")
        #expect(status(toks[6], path) == 403, "HS256 refused")
        #expect(status(toks[7], path) == 403, "no exp")
        #expect(status(toks[8], path) == 403, "filename claim differs from the path")
        #expect(status(nil, path) == 403, "no Authorization")
        #expect(status(toks[9], "../x") == 403, "..")
        #expect(status(toks[10], "escape/passwd") == 403, "directory symlink out of the folder")
        #expect(status(toks[11], "dag_id=demo/run_id=r1/task_id=t1/link.log") == 403, "file symlink out of the folder")
        #expect(status(toks[12], "dag_id=demo/missing.log") == 404)
        let ok = LogServer.respond(
            HTTPRequest(method: "GET", path: "/log/" + path, headers: ["authorization": toks[0]]), base: base, verifier: v, logger: AF.logger,
            now: signedAt)
        #expect(String(decoding: ok.body, as: UTF8.self) == "hello from attempt 1\n")
    }

    @Test("over HTTP, fetched the way Airflow's API server fetches a worker's log")
    func overHTTP() async throws {
        let base = try Self.folder()
        let server = LogServer(host: "127.0.0.1", port: 0, baseLogFolder: base, secretKey: Self.secret, logger: AF.logger)
        try server.start()
        defer { server.stop() }
        let port = server.port
        let out = try await offPoolRun(
            """
            import sys, requests
            from airflow.api_fastapi.auth.tokens import JWTGenerator
            port, secret, rel = sys.argv[1], sys.argv[2], sys.argv[3]
            g = JWTGenerator(secret_key=secret, algorithm="HS512", private_key=None, issuer=None, valid_for=30, audience="task-instance-logs")
            url = f"http://127.0.0.1:{port}/log/{rel}"
            r = requests.get(url, headers={"Authorization": g.generate({"filename": rel})}, timeout=5)
            print("RESULT", r.status_code, repr(r.text))
            r = requests.get(url, headers={"Authorization": g.generate({"filename": "x"})}, timeout=5)
            print("RESULT", r.status_code)
            """, args: ["\(port)", Self.secret, "dag_id=demo/run_id=r1/task_id=t1/attempt=1.log"])
        #expect(out.status == 0, "\(out.stderr)")
        let lines = out.stdout.split(separator: "\n").filter { $0.hasPrefix("RESULT ") }.map { String($0.dropFirst(7)) }
        #expect(lines.first == "200 'hello from attempt 1\\n'")
        #expect(lines.dropFirst().first == "403")
    }
}

func offPoolRun(_ script: String, args: [String] = [], env: [String: String] = [:]) async throws -> AF.Output {
    try await withCheckedThrowingContinuation { c in
        Thread {
            do { c.resume(returning: try AF.run(script, args: args, env: env)) } catch { c.resume(throwing: error) }
        }.start()
    }
}
