import Redis
import Testing

@Suite("Redis without a server")
struct RedisUnitTests {
    @Test func sha1KnownVectors() {
        #expect(SHA1.hex([]) == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(SHA1.hex(Array("abc".utf8)) == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(SHA1.hex(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
            == "84983e441c3bd26ebaae4aa1f95129e5e54670f1")
        #expect(SHA1.hex(Array("The quick brown fox jumps over the lazy dog".utf8))
            == "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12")
        #expect(SHA1.hex([UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000))
            == "34aa973cd4c4daa4f61eeb2bdbad27316534016f")
        #expect(RedisScript(name: "x", source: "return 1").sha1 == SHA1.hex(Array("return 1".utf8)))
    }

    @Test func parsesTcpURLs() throws {
        let c = try RedisConfiguration(url: "redis://alice:p%40ss%3Aword@redis.example:6390/3")
        #expect(c.endpoint == .tcp(host: "redis.example", port: 6390))
        #expect(c.username == "alice")
        #expect(c.password == "p@ss:word")
        #expect(c.database == 3)
        #expect(c.redacted == "redis://alice:***@redis.example:6390/3")
        #expect(!c.redacted.contains("word"))

        let d = try RedisConfiguration(url: "redis://:secret@localhost")
        #expect(d.endpoint == .tcp(host: "localhost", port: 6379))
        #expect(d.username == nil && d.password == "secret" && d.database == 0)

        let e = try RedisConfiguration(url: "redis://[::1]:7000/2")
        #expect(e.endpoint == .tcp(host: "::1", port: 7000))
        #expect(e.database == 2)

        let f = try RedisConfiguration(url: "redis://h")
        #expect(f.endpoint == .tcp(host: "h", port: 6379))
    }

    @Test func parsesSocketURLs() throws {
        let a = try RedisConfiguration(url: "redis+socket:///run/redis.sock?virtual_host=4")
        #expect(a.endpoint == .unix(path: "/run/redis.sock"))
        #expect(a.database == 4)
        let b = try RedisConfiguration(url: "unix:///tmp/r.sock")
        #expect(b.endpoint == .unix(path: "/tmp/r.sock"))
        #expect(b.database == 0)
        let c = try RedisConfiguration(url: "unix://:pw@/tmp/r.sock?db=2")
        #expect(c.password == "pw" && c.database == 2)
    }

    @Test func parsesSentinelURLs() throws {
        let s = try RedisConfiguration(
            url: "sentinel://:pw@10.0.0.1:26379/1;sentinel://10.0.0.2:26380;sentinel://10.0.0.3",
            masterName: "mymaster", sentinelPassword: "spw")
        #expect(s.endpoint == .sentinel(nodes: [
            .init(host: "10.0.0.1", port: 26379), .init(host: "10.0.0.2", port: 26380), .init(host: "10.0.0.3", port: 26379),
        ], masterName: "mymaster", sentinelPassword: "spw"))
        #expect(s.password == "pw" && s.database == 1)
        #expect(!s.redacted.contains("pw@"))

        let err = #expect(throws: RedisError.self) { try RedisConfiguration(url: "sentinel://h:26379") }
        #expect(err?.code == .invalidURL)
        #expect(err?.message.contains("master_name") == true)
        #expect(err?.message.contains("AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__MASTER_NAME") == true)
    }

    @Test(arguments: [
        "rediss://h:6380/0?ssl_cert_reqs=Sometimes", "rediss://h/0?ssl_check_hostname=maybe", "amqp://guest@h//", "redis://h:notaport/0", "redis://h:6379/x", "localhost:6379",
        "redis://h:70000", "unix://", "sentinel://a:1;redis://b:2",
    ])
    func rejectsBadURLs(url: String) {
        let err = #expect(throws: RedisError.self) { try RedisConfiguration(url: url, masterName: "m") }
        #expect(err?.code == .invalidURL)
    }

    /// TLS as kombu decides it (kombu/utils/url.py, kombu/connection.py): `ssl_*` parameters turn it on with
    /// their settings, whatever the scheme; a bare `rediss://` is TLS that checks nothing (kombu's default).
    @Test func tlsFromTheURL() throws {
        let full = try RedisConfiguration(url: "rediss://:hunter2@h:6380/2?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ca%20file.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false")
        #expect(full.endpoint == .tcp(host: "h", port: 6380) && full.database == 2 && full.password == "hunter2")
        #expect(full.tls?.verifyPeer == true && full.tls?.checkHostname == false && full.tls?.schemeOnly == false)
        #expect(full.tls?.caFile == "/etc/ca file.pem" && full.tls?.certFile == "/c.pem" && full.tls?.keyFile == "/k.pem")
        #expect(full.redacted == "rediss://:***@h:6380/2")

        let bare = try RedisConfiguration(url: "rediss://h")
        #expect(bare.tls?.verifyPeer == false && bare.tls?.schemeOnly == true)
        #expect(try RedisConfiguration(url: "rediss://h?ssl_cert_reqs=none").tls?.verifyPeer == false)
        #expect(try RedisConfiguration(url: "rediss://h?ssl_cert_reqs=optional").tls?.verifyPeer == true)
        // redis-py's default when only a CA is given: required, host name checked
        let caOnly = try RedisConfiguration(url: "rediss://h?ssl_ca_certs=/ca.pem").tls
        #expect(caOnly?.verifyPeer == true && caOnly?.checkHostname == true)
        // kombu turns TLS on for ssl_* parameters on redis:// too; none means plain TCP
        #expect(try RedisConfiguration(url: "redis://h?ssl_cert_reqs=required").tls?.verifyPeer == true)
        #expect(try RedisConfiguration(url: "redis://h/0?other=1").tls == nil)
        // Airflow 2 writes unset files as empty strings: no file
        #expect(try RedisConfiguration(url: "rediss://h?ssl_ca_certs=&ssl_certfile=").tls?.caFile == nil)

        // a TLS setting Tandem does not implement is refused, not ignored; the key's password is never echoed
        let unsupported = #expect(throws: RedisError.self) {
            try RedisConfiguration(url: "rediss://h/0?ssl_password=s3cret&ssl_validate_ocsp=true")
        }
        #expect(unsupported?.message.contains("ssl_validate_ocsp is not supported") == true, "\(String(describing: unsupported))")
        #expect(unsupported?.message.contains("s3cret") == false)
        let withPath = try RedisConfiguration(url: "rediss://h/0?ssl_ca_path=/etc/ssl/certs&ssl_password=pw%26x").tls
        #expect(withPath?.caPath == "/etc/ssl/certs" && withPath?.keyPassword == "pw&x")

        let err = #expect(throws: RedisError.self) { try RedisConfiguration(url: "rediss://:hunter2@h/0?ssl_cert_reqs=2") }
        #expect(err?.message.contains("required, optional or none") == true)
        #expect(err?.message.contains("hunter2") == false)
    }

    @Test func valueAccessors() {
        #expect(RedisValue.bulk(Array("12".utf8)).int == 12)
        #expect(RedisValue.simpleString("OK").string == "OK")
        #expect(RedisValue.integer(5).string == nil)
        #expect(RedisValue.null.isNull)
        #expect(RedisValue.array([.integer(1)]).array == [.integer(1)])
        #expect(RedisValue.bulk([0, 1]).bytes == [0, 1])
        #expect(RedisTime(seconds: 2, microseconds: 345_678).milliseconds == 2345)
    }
}
