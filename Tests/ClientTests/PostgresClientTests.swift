import Foundation
import Postgres
import Testing
import TestSupport

private func pgClient(_ url: String) throws -> PostgresClient {
    PostgresClient(configuration: try PostgresConfiguration(url: url), logger: quietLogger)
}

@Suite("Postgres configuration")
struct PostgresConfigurationTests {
    @Test(arguments: [
        "postgresql://u:pw@db.example:5433/airflow", "postgres://u:pw@db.example:5433/airflow",
        "db+postgresql://u:pw@db.example:5433/airflow", "db+postgresql+psycopg2://u:pw@db.example:5433/airflow",
        "db+postgresql+psycopg://u:pw@db.example:5433/airflow", "postgresql+psycopg2://u:pw@db.example:5433/airflow",
        "host=db.example port=5433 user=u password=pw dbname=airflow",
    ])
    func spellingsParseToTheSameConninfo(url: String) throws {
        let c = try PostgresConfiguration(url: url)
        #expect(c.conninfo.contains("host='db.example'"))
        #expect(c.conninfo.contains("port='5433'"))
        #expect(c.conninfo.contains("dbname='airflow'"))
        #expect(c.conninfo.contains("user='u'"))
        #expect(c.conninfo.contains("password='pw'"))
        #expect(c.conninfo.contains("options='-c TimeZone=UTC -c client_min_messages=warning'"))
        #expect(c.conninfo.contains("application_name="))
        #expect(c.redacted == "postgresql://u:***@db.example:5433/airflow")
    }

    @Test func multiHost() throws {
        let c = try PostgresConfiguration(url: "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write")
        #expect(c.conninfo.contains("host='h1,h2'"))
        #expect(c.conninfo.contains("port='5432,5433'"))
        #expect(c.conninfo.contains("target_session_attrs='read-write'"))
        #expect(c.redacted == "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write")
    }

    @Test(arguments: ["mysql://u@h/db", "postgresql://h/db?nosuchoption=1", "just words", "db+sqlite:///x.db"])
    func badURLs(url: String) {
        let err = #expect(throws: PostgresError.self) { try PostgresConfiguration(url: url) }
        #expect(err?.code == .invalidURL)
    }

    @Test("a dead link is noticed in seconds: tcp_user_timeout and keepalives are set unless the URL sets its own")
    func deadLinkSettings() throws {
        let c = try PostgresConfiguration(url: "postgresql://u@h/db")
        for setting in ["tcp_user_timeout='20000'", "keepalives_idle='10'", "keepalives_interval='5'", "keepalives_count='3'"] {
            #expect(c.conninfo.contains(setting), "\(c.conninfo)")
        }
        let own = try PostgresConfiguration(url: "postgresql://u@h/db?tcp_user_timeout=5000&keepalives_idle=60")
        #expect(own.conninfo.contains("tcp_user_timeout='5000'") && !own.conninfo.contains("tcp_user_timeout='20000'"))
        #expect(own.conninfo.contains("keepalives_idle='60'") && !own.conninfo.contains("keepalives_idle='10'"))
    }

    @Test func badURLHidesPassword() {
        let err = #expect(throws: PostgresError.self) { try PostgresConfiguration(url: "mysql://u:hunter2@h/db") }
        #expect(err?.message.contains("hunter2") == false)
    }
}

@Suite("Postgres against a real server")
struct PostgresClientTests {
    @Test func bindsOfEveryKind() async throws {
        let client = try pgClient(try await freshDatabase())
        defer { client.close() }
        let blob: [UInt8] = [0, 1, 0, 0xff, 0x5c, 0x78, 0]
        let r = try await client.query(
            "SELECT $1::text AS t, $2::bigint AS i, $3::bytea AS b, $4::text AS n, $5::int + 1 AS j, $6::bytea AS e",
            [.text("héllo 'quoted' \\ x"), .int(-42), .bytea(blob), .null, .int(41), .bytea([])])
        let row = try #require(r.rows.first)
        #expect(r.columns == ["t", "i", "b", "n", "j", "e"])
        #expect(row.string("t") == "héllo 'quoted' \\ x")
        #expect(row.int("i") == -42)
        #expect(row.bytea("b") == blob)
        #expect(row.isNull("n"))
        #expect(row.string("n") == nil)
        #expect(row.int("j") == 42)
        #expect(row.bytea("e") == [])
        #expect(row.int(1) == -42)
        #expect(row.bytea(2) == blob)
        #expect(!row.isNull(0))
    }

    @Test func tablesAndAffectedRows() async throws {
        let client = try pgClient(try await freshDatabase())
        defer { client.close() }
        _ = try await client.query("CREATE TABLE t (id int PRIMARY KEY, payload bytea, note text)")
        for i in 1...3 {
            _ = try await client.query("INSERT INTO t VALUES ($1, $2, $3)", [.int(Int64(i)), .bytea([UInt8(i), 0]), .null])
        }
        let u = try await client.query("UPDATE t SET note = $1 WHERE id >= $2", [.text("x"), .int(2)])
        #expect(u.affectedRows == 2)
        let s = try await client.query("SELECT id, payload FROM t ORDER BY id")
        #expect(s.rows.map { $0.int("id") } == [1, 2, 3])
        #expect(s.rows[2].bytea("payload") == [3, 0])
    }

    @Test func transactionsCommitAndRollBack() async throws {
        let client = try pgClient(try await freshDatabase())
        defer { client.close() }
        _ = try await client.query("CREATE TABLE t (id int PRIMARY KEY)")
        let n = try await client.transaction { tx in
            _ = try tx.query("INSERT INTO t VALUES ($1)", [.int(1)])
            _ = try tx.query("INSERT INTO t VALUES ($1)", [.int(2)])
            return try tx.query("SELECT count(*) AS c FROM t").rows[0].int("c") ?? -1
        }
        #expect(n == 2)

        struct Boom: Error {}
        await #expect(throws: Boom.self) {
            try await client.transaction { tx in
                _ = try tx.query("INSERT INTO t VALUES ($1)", [.int(3)])
                throw Boom()
            }
        }
        #expect(try await client.query("SELECT count(*) AS c FROM t").rows[0].int("c") == 2)

        // A failed statement swallowed inside the body: COMMIT becomes ROLLBACK, and we say so.
        let err = await #expect(throws: PostgresError.self) {
            try await client.transaction { tx in
                _ = try tx.query("INSERT INTO t VALUES ($1)", [.int(4)])
                _ = try? tx.query("INSERT INTO t VALUES ($1)", [.int(1)])
            }
        }
        #expect(err?.code == .transaction)
        #expect(try await client.query("SELECT count(*) AS c FROM t").rows[0].int("c") == 2)
    }

    @Test func errorsCarrySQLState() async throws {
        let client = try pgClient(try await freshDatabase())
        defer { client.close() }
        _ = try await client.query("CREATE TABLE t (id int PRIMARY KEY)")
        _ = try await client.query("INSERT INTO t VALUES (1)")
        let dup = await #expect(throws: PostgresError.self) { try await client.query("INSERT INTO t VALUES (1)") }
        #expect(dup?.sqlState == "23505")
        #expect(dup?.code == .query)
        #expect(dup?.isConnectionLoss == false)
        let syntax = await #expect(throws: PostgresError.self) { try await client.query("SELEC 1") }
        #expect(syntax?.sqlState == "42601")
        #expect(try await client.query("SELECT 1 AS one").rows[0].int("one") == 1)
    }

    @Test func timeZoneIsUTC() async throws {
        let client = try pgClient(try await freshDatabase())
        defer { client.close() }
        #expect(try await client.query("SHOW TimeZone").rows[0].string(0) == "UTC")
        let app = try await client.query("SELECT current_setting('application_name') AS a").rows[0].string("a")
        #expect(app == "tandem")
    }

    @Test func multiHostSkipsADeadFirstHost() async throws {
        let server = try await offPool { try PostgresServer.shared() }
        let db = try await freshDatabase().split(separator: "/").last!
        let dead = freeLoopbackPort()
        let client = try pgClient(
            "db+postgresql://postgres@127.0.0.1:\(dead),127.0.0.1:\(server.port)/\(db)?target_session_attrs=read-write")
        defer { client.close() }
        let r = try await client.query("SELECT inet_server_port() AS p")
        #expect(r.rows[0].int("p") == Int64(server.port))
    }

    @Test func deadServerSaysWhatToDo() async throws {
        let port = freeLoopbackPort()
        let client = try pgClient("postgresql://postgres:hunter2@127.0.0.1:\(port)/x")
        let err = await #expect(throws: PostgresError.self) { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("postgresql://postgres:***@127.0.0.1:\(port)/x") == true)
        #expect(err?.message.contains("AIRFLOW__CELERY__RESULT_BACKEND") == true)
        #expect(err?.message.contains("hunter2") == false)
        #expect(err?.message.contains("\n") == false)
    }

    @Test("a server that stops answering (every byte dropped) fails the call after the reply timeout, saying so — single statements, pipelines and transactions alike; the connection is dropped and, once answers flow again, the next call reconnects")
    func replyTimeoutDropsTheConnection() async throws {
        let url = try #require(URLComponents(string: try await freshDatabase()))
        let link = try FaultProxy(upstreamPort: try #require(url.port))
        defer { link.stop() }
        var config = try PostgresConfiguration(url: "postgresql://postgres@127.0.0.1:\(link.port)\(url.path)")
        config.replyTimeout = .seconds(1)
        let client = PostgresClient(configuration: config, logger: quietLogger)
        defer { client.close() }
        _ = try await client.query("CREATE TABLE t (id int)")
        _ = try await client.pipeline([("INSERT INTO t VALUES ($1)", [.int(1)]), ("INSERT INTO t VALUES ($1)", [.int(2)])])
        link.partition()
        let single = await #expect(throws: PostgresError.self) { try await client.query("SELECT count(*) FROM t") }
        #expect(single?.isConnectionLoss == true)
        // (the statement is new to the connection, so what went unanswered is its PREPARE)
        #expect(single?.message.contains("did not answer PREPARE within 1s (TANDEM_POSTGRES_REPLY_TIMEOUT)") == true, "\(String(describing: single))")
        link.heal()
        #expect(try await client.query("SELECT count(*) AS n FROM t").rows[0].int("n") == 2)
        link.partition()
        let batch = await #expect(throws: PostgresError.self) {
            try await client.pipeline([("INSERT INTO t VALUES ($1)", [.int(3)]), ("INSERT INTO t VALUES ($1)", [.int(4)])])
        }
        #expect(batch?.isConnectionLoss == true)
        link.heal()
        // a pipeline is one transaction: the lost batch either landed whole or not at all
        let n = try await client.query("SELECT count(*) AS n FROM t").rows[0].int("n")
        #expect(n == 2 || n == 4)
        link.partition()
        await #expect(throws: (any Error).self) {
            try await client.transaction { tx in _ = try tx.query("INSERT INTO t VALUES ($1)", [.int(5)]) }
        }
        link.heal()
        #expect(try await client.query("SELECT count(*) AS n FROM t WHERE id = 5").rows[0].int("n") == 0)
    }

    @Test(.timeLimit(.minutes(2)))
    func reconnectsAfterServerRestart() async throws {
        let server = try await offPool { try PostgresServer.start() }
        defer { server.stop() }
        let client = try pgClient(server.url)
        defer { client.close() }
        _ = try await client.query("CREATE TABLE t (id int)")
        try await offPool { try server.restart() }
        // The first statement may find the old connection dead; it is not retried silently.
        do {
            _ = try await client.query("INSERT INTO t VALUES (1)")
        } catch {
            #expect(error.isConnectionLoss)
        }
        _ = try await client.query("INSERT INTO t VALUES (2)")
        #expect(try await client.query("SELECT count(*) FROM t WHERE id = 2").rows[0].int(0) == 1)

        server.kill(signal: SIGKILL)
        let down = await #expect(throws: PostgresError.self) { try await client.query("SELECT 1") }
        #expect(down?.isConnectionLoss == true)
        let still = await #expect(throws: PostgresError.self) { try await client.query("SELECT 1") }
        #expect(still?.code == .connectionFailed)
        try await offPool { try server.restart() }
        #expect(try await client.query("SELECT 1 AS x").rows[0].int("x") == 1)
    }
}

/// The result backend over TLS (across datacenters it crosses a WAN): libpq's own TLS, with the certificate and
/// host name checked (`sslmode=verify-full`), replies far larger than a TLS record read through the reply-deadline
/// loop, and a server whose CA is not trusted refused with libpq's reason.
@Suite("Postgres over TLS against a real server")
struct PostgresTLSTests {
    @Test(.timeLimit(.minutes(2)))
    func verifiedTLSWithLargeReplies() async throws {
        let certs = try await offPool { try TLSCertificates.make() }
        let server = try await offPool { try PostgresServer.start(tls: certs) }
        defer { server.stop() }
        var config = try PostgresConfiguration(
            url: "db+postgresql://postgres@127.0.0.1:\(server.port)/postgres?sslmode=verify-full&sslrootcert=\(certs.caFile)")
        // a reply stuck behind bytes OpenSSL already decrypted would wait this out and fail
        config.replyTimeout = .seconds(5)
        let client = PostgresClient(configuration: config, logger: quietLogger)
        defer { client.close() }
        #expect(try await client.query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").rows[0].string("ssl") == "t")
        for size in [1_000, 16_000, 16_384, 40_000, 1_000_000] {
            let started = ContinuousClock.now
            let rows = try await client.query("SELECT repeat('x', $1::int) AS v FROM generate_series(1, 3)", [.int(Int64(size))]).rows
            #expect(rows.count == 3 && rows.allSatisfy { $0.string("v")?.count == size }, "size \(size)")
            #expect(ContinuousClock.now - started < .seconds(5), "size \(size) waited out the reply deadline")
        }
        // replies of every shape against libpq's buffer (8-16 KiB free per read) and TLS records (16 KiB)
        var slowest: Duration = .zero
        for size in stride(from: 500, through: 40_000, by: 1_300) {
            for rows in [1, 2, 5] {
                let started = ContinuousClock.now
                let got = try await client.query("SELECT repeat('z', $1::int) AS v FROM generate_series(1, $2::int)",
                                                 [.int(Int64(size)), .int(Int64(rows))]).rows
                slowest = max(slowest, ContinuousClock.now - started)
                #expect(got.count == rows && got.allSatisfy { $0.string("v")?.count == size })
            }
        }
        #expect(slowest < .seconds(5), "a reply waited out the deadline: \(slowest)")
        let results = try await client.pipeline((0..<20).map { _ in ("SELECT repeat('y', 20000) AS v", []) })
        #expect(results.count == 20 && results.allSatisfy { $0.rows.first?.string("v")?.count == 20_000 })

        let untrusted = try pgClient("postgresql://postgres@127.0.0.1:\(server.port)/postgres?sslmode=verify-full&sslrootcert=\(certs.otherCAFile)&connect_timeout=5")
        defer { untrusted.close() }
        let err = await #expect(throws: PostgresError.self) { try await untrusted.query("SELECT 1") }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.contains("certificate verify failed") == true, "\(String(describing: err))")
    }
}
