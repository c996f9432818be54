import HTTPServer
import Logging

/// The probe and metrics endpoints of a Tandem process.
public enum ObservabilityEndpoints {
    /// `/metrics` (Prometheus text 0.0.4), `/healthz` (200 while the process serves HTTP), and `/readyz` (200, or 503
    /// with the one-line reason `ready` returns).
    public static func routes(registry: MetricsRegistry, ready: @escaping @Sendable () -> String?) -> [String: HTTPServer.Handler] {
        [
            "/metrics": { _ in .text(registry.render(), contentType: "text/plain; version=0.0.4; charset=utf-8") },
            "/healthz": { _ in .text("ok\n") },
            "/readyz": { _ in
                if let why = ready() { return .text("not ready: \(why)\n", status: 503) }
                return .text("ready\n")
            },
        ]
    }

    /// Starts the endpoints on `port` (nil when the port is 0: disabled). Throws when the port cannot be bound.
    public static func serve(
        host: String = "0.0.0.0", port: Int, registry: MetricsRegistry, ready: @escaping @Sendable () -> String?,
        logger: Logger
    ) throws -> HTTPServer? {
        guard port != 0 else { return nil }
        let server = HTTPServer(host: host, port: port, routes: routes(registry: registry, ready: ready), logger: logger)
        try server.start()
        return server
    }
}

extension ObservabilityEndpoints {
    /// `serve`, but a port that cannot be bound is logged (with what to do) and the process goes on without
    /// the endpoints: a worker should not stop running tasks because its metrics port is taken.
    public static func serveOrLog(
        host: String = "0.0.0.0", port: Int, registry: MetricsRegistry, ready: @escaping @Sendable () -> String?,
        logger: Logger
    ) -> HTTPServer? {
        do {
            return try serve(host: host, port: port, registry: registry, ready: ready, logger: logger)
        } catch {
            logger.error("no /metrics, /healthz or /readyz: \(error) — set --metrics-port or TANDEM_METRICS_PORT (0 disables)")
            return nil
        }
    }
}
