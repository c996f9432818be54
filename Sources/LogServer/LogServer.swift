#if canImport(Glibc)
    import Glibc
#endif
import Foundation
import HTTPServer
import Logging

/// Serves task logs to Airflow's API server as `airflow celery worker` does: `GET /log/<relative path>` from
/// `[logging] base_log_folder`, with `Authorization: <JWT>` signed HS512 with `[api] secret_key` (Airflow 2:
/// `[webserver] secret_key`), audience `task-instance-logs`, claim `filename` equal to the path.
/// 403 for a missing or bad token or a path outside the folder (`..`, symlinks out); 404 for a missing file.
public final class LogServer: Sendable {
    public let baseLogFolder: String
    let verifier: JWTVerifier
    let logger: Logger
    let server: HTTPServer

    public init(host: String = "0.0.0.0", port: Int, baseLogFolder: String, secretKey: String, leeway: Double = 30, logger: Logger) {
        self.baseLogFolder = baseLogFolder
        let verifier = JWTVerifier(secretKey: secretKey, leeway: leeway)
        self.verifier = verifier
        self.logger = logger
        let base = baseLogFolder
        let log = logger
        self.server = HTTPServer(
            host: host, port: port,
            routes: ["/log/": { req in LogServer.respond(req, base: base, verifier: verifier, logger: log) }],
            logger: logger)
    }

    public func start() throws { try server.start() }
    public var port: Int { server.port }
    public func stop() { server.stop() }

    /// The whole request → response decision, separate from sockets so tests can call it.
    public static func respond(_ req: HTTPRequest, base: String, verifier: JWTVerifier, logger: Logger, now: Date = Date()) -> HTTPResponse {
        guard req.path.hasPrefix("/log/") else { return .text("not found\n", status: 404) }
        let relative = String(req.path.dropFirst("/log/".count))
        guard let auth = req.headers["authorization"], !auth.isEmpty else {
            logger.warning("log request without an Authorization header", metadata: ["path": .string(relative), "peer": .string(req.peer)])
            return .text("Authorization header missing\n", status: 403)
        }
        switch verifier.verify(auth, now: now) {
        case .failure(let why):
            logger.warning("log request refused: \(why)", metadata: ["path": .string(relative), "peer": .string(req.peer)])
            return .text("Forbidden\n", status: 403)
        case .success(let claims):
            guard let filename = claims["filename"] as? String, filename == relative else {
                logger.warning("log request refused: token 'filename' differs from the path", metadata: ["path": .string(relative)])
                return .text("Forbidden\n", status: 403)
            }
        }
        switch resolve(base: base, relative: relative) {
        case .outside:
            logger.warning("log request refused: path escapes base_log_folder", metadata: ["path": .string(relative)])
            return .text("Forbidden\n", status: 403)
        case .missing:
            return .text("Not Found\n", status: 404)
        case .file(let path):
            guard let data = FileManager.default.contents(atPath: path) else { return .text("Not Found\n", status: 404) }
            return HTTPResponse(status: 200, headers: [("Content-Type", "text/plain; charset=utf-8")], body: Array(data))
        }
    }

    public enum Resolved: Equatable {
        case file(String)
        case missing
        case outside
    }

    /// Resolves `relative` inside `base`, following symlinks: anything that lands outside is `.outside`.
    public static func resolve(base: String, relative: String) -> Resolved {
        if relative.isEmpty || relative.hasPrefix("/") || relative.contains("\0") { return .outside }
        let comps = relative.split(separator: "/", omittingEmptySubsequences: false)
        if comps.contains(where: { $0 == ".." }) { return .outside }
        guard let realBase = realPath(base) else { return .missing }
        let candidate = realBase + "/" + relative
        guard let real = realPath(candidate) else {
            // a missing file: its existing parent must still be inside
            return .missing
        }
        guard real.hasPrefix(realBase + "/") else { return .outside }
        var st = stat()
        guard stat(real, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return .missing }
        return .file(real)
    }

    static func realPath(_ p: String) -> String? {
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }
}
