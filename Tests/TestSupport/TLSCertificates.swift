import Foundation

/// Throwaway certificates made with the `openssl` command for TLS tests: a CA, a server certificate it signs for
/// 127.0.0.1 only (no DNS name, so `localhost` is a name mismatch), a client certificate it signs, and a second
/// CA that signs only `otherServerCert` (trusting it alone must fail against `serverCert`, as for a CA rotated in).
/// Files live in a temp dir removed when dropped.
public final class TLSCertificates: Sendable {
    public let directory: String
    public var caFile: String { directory + "/ca.crt" }
    public var otherCAFile: String { directory + "/other-ca.crt" }
    public var serverCert: String { directory + "/server.crt" }
    public var serverKey: String { directory + "/server.key" }
    /// A certificate for 127.0.0.1 signed by the other CA: what a server presents after its CA was rotated.
    public var otherServerCert: String { directory + "/other-server.crt" }
    public var otherServerKey: String { directory + "/other-server.key" }
    public var clientCert: String { directory + "/client.crt" }
    public var clientKey: String { directory + "/client.key" }
    /// The client key encrypted (AES-256) with `encryptedKeyPassword`.
    public var encryptedClientKey: String { directory + "/client-encrypted.key" }
    public let encryptedKeyPassword = "tandem-key-pw"
    /// A directory holding the CA under its hashed name (`openssl rehash`), for `ssl_ca_path`.
    public var caDirectory: String { directory + "/ca-dir" }

    private init(directory: String) { self.directory = directory }
    deinit { Spawn.removeDirectory(directory) }

    public static func make() throws -> TLSCertificates {
        guard let openssl = TestEnvironment.which("openssl") else {
            throw TestSupportError("openssl not found on PATH — run scripts/bootstrap (apt package openssl)")
        }
        let dir = try Spawn.tempDirectory("tandem-tls")
        let certs = TLSCertificates(directory: dir)
        let log = dir + "/openssl.log"
        func run(_ args: [String]) throws { try Spawn.run([openssl] + args, log: log, directory: dir) }
        for ca in ["ca", "other-ca"] {
            try run(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(dir)/\(ca).key", "-out", "\(dir)/\(ca).crt",
                     "-days", "2", "-subj", "/CN=tandem-test-\(ca)"])
        }
        for (name, ext, ca) in [("server", "subjectAltName=IP:127.0.0.1", "ca"), ("client", "extendedKeyUsage=clientAuth", "ca"),
                                ("other-server", "subjectAltName=IP:127.0.0.1", "other-ca")] {
            let base = "\(dir)/\(name)"
            try run(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(base).key", "-out", "\(base).csr",
                     "-subj", "/CN=tandem-test-\(name)"])
            try ext.write(toFile: "\(base).ext", atomically: true, encoding: .utf8)
            try run(["x509", "-req", "-in", "\(base).csr", "-CA", "\(dir)/\(ca).crt", "-CAkey", "\(dir)/\(ca).key",
                     "-CAcreateserial", "-out", "\(base).crt", "-days", "2", "-extfile", "\(base).ext"])
        }
        try run(["pkey", "-in", certs.clientKey, "-aes256", "-passout", "pass:\(certs.encryptedKeyPassword)",
                 "-out", certs.encryptedClientKey])
        try FileManager.default.createDirectory(atPath: certs.caDirectory, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: certs.caFile, toPath: certs.caDirectory + "/ca.pem")
        try run(["rehash", certs.caDirectory])
        return certs
    }
}
