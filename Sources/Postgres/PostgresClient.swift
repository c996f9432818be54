import CLibpq
import Dispatch
import ClientSupport
import Foundation
import Logging

/// Logger metadata keys used by this module, in one place.
enum PostgresLogKey {
    static let endpoint = "postgres.endpoint"
    static let label = "postgres.label"
    static let error = "postgres.error"
}

/// A Postgres connection whose blocking libpq calls run on its own serial queue, never on the Swift
/// concurrency pool. Connects lazily; after a connection loss the next call reconnects (with backoff).
/// A statement that failed because the connection broke is never re-run silently.
public final class PostgresClient: Sendable {
    /// What this client connects to.
    public let configuration: PostgresConfiguration
    private let logger: Logger
    private let queue: DispatchQueue
    private let core = Core()
    private let closed = Locked(false)

    /// State touched only on `queue`.
    private final class Core: @unchecked Sendable {
        var connection: PostgresConnection?
        var backoff = Backoff()
    }

    /// Makes a client; nothing connects until `connect()` or the first statement.
    public init(configuration: PostgresConfiguration, label: String = "postgres", logger: Logger) {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: PostgresLogKey.label] = "\(label)"
        self.logger = logger
        self.queue = DispatchQueue(label: "tandem.postgres.\(label)")
    }

    /// Connects now so a bad URL or a dead server is reported at startup.
    public func connect() async throws(PostgresError) {
        try await run { core throws(PostgresError) in _ = try self.connection(core) }
    }

    /// Runs one statement with `$1`-style parameters.
    public func query(_ sql: String, _ binds: [PostgresBind] = []) async throws(PostgresError) -> PostgresResult {
        try await onConnection { conn throws(PostgresError) in try conn.exec(sql, binds) }
    }

    /// Runs the statements as one pipelined, all-or-nothing transaction in one round trip (see
    /// `PostgresConnection.pipeline`). For statements that do not need each other's answers.
    public func pipeline(_ statements: [(sql: String, binds: [PostgresBind])]) async throws(PostgresError) -> [PostgresResult] {
        try await onConnection { conn throws(PostgresError) in try conn.pipeline(statements) }
    }

    /// Runs `body` on this client's connection (connecting first if needed); a lost connection is dropped so the
    /// next call reconnects.
    private func onConnection<T: Sendable>(
        _ body: @escaping @Sendable (PostgresConnection) throws(PostgresError) -> T
    ) async throws(PostgresError) -> T {
        try await run { core throws(PostgresError) in
            let conn = try self.connection(core)
            do throws(PostgresError) {
                return try body(conn)
            } catch {
                if error.isConnectionLoss { self.broken(core, error) }
                throw error
            }
        }
    }

    /// BEGIN, the body (synchronously, on this connection's own queue), COMMIT; ROLLBACK if the body throws.
    /// Throws `.transaction` when COMMIT turned into a rollback because a statement inside had failed.
    public func transaction<T: Sendable>(_ body: @escaping @Sendable (PostgresTransaction) throws -> T) async throws -> T {
        let core = self.core
        let result: Result<T, any Error> = await withCheckedContinuation { continuation in
            queue.async {
                continuation.resume(returning: Result { try self.runTransaction(core, body) })
            }
        }
        return try result.get()
    }

    /// Closes the connection; later calls throw `.closed`.
    public func close() {
        let was = closed.withLock { c -> Bool in
            defer { c = true }
            return c
        }
        guard !was else { return }
        let core = self.core
        queue.async { core.connection = nil }
    }

    /// Whether a server answers at this configuration (blocking `PQping`; for tools and tests).
    public static func ping(configuration: PostgresConfiguration) -> Bool {
        PQping(configuration.conninfo) == PQPING_OK
    }

    // MARK: - On the queue

    private func runTransaction<T>(_ core: Core, _ body: (PostgresTransaction) throws -> T) throws -> T {
        let conn = try connection(core)
        do throws(PostgresError) {
            _ = try conn.execTag("BEGIN")
        } catch {
            if error.isConnectionLoss { broken(core, error) }
            throw error
        }
        let tx = PostgresTransaction(connection: conn, client: self, core: core)
        let value: T
        do {
            value = try body(tx)
        } catch {
            tx.valid = false
            if conn.isHealthy {
                _ = try? conn.execTag("ROLLBACK")
            } else {
                broken(core, PostgresError(code: .query, message: "connection lost inside a transaction", isConnectionLoss: true))
            }
            throw error
        }
        tx.valid = false
        do throws(PostgresError) {
            let tag = try conn.execTag("COMMIT")
            if tag != "COMMIT" {
                throw PostgresError(
                    code: .transaction,
                    message: "Postgres at \(configuration.redacted) rolled the transaction back instead of committing: a statement inside it had failed"
                )
            }
        } catch {
            if error.isConnectionLoss { broken(core, error) }
            throw PostgresError(code: .transaction,
                                message: error.code == .transaction ? error.message : "COMMIT failed: \(error.message)",
                                sqlState: error.sqlState, underlying: error.underlying, isConnectionLoss: error.isConnectionLoss)
        }
        return value
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable (Core) throws(PostgresError) -> T) async throws(PostgresError) -> T {
        let core = self.core
        let result: Result<T, PostgresError> = await withCheckedContinuation { continuation in
            queue.async {
                do throws(PostgresError) {
                    continuation.resume(returning: .success(try body(core)))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }

    private func connection(_ core: Core) throws(PostgresError) -> PostgresConnection {
        if closed.current {
            core.connection = nil
            throw PostgresError(code: .closed, message: "Postgres client for \(configuration.redacted) is closed")
        }
        if let c = core.connection {
            if c.isHealthy { return c }
            core.connection = nil
        }
        core.backoff.wait(limit: .seconds(2))
        do {
            let c = try PostgresConnection.open(configuration)
            core.connection = c
            core.backoff.succeeded()
            ConnectionStats.postgresConnects.withLock { $0 += 1 }
            logger.debug("connected to Postgres", metadata: [PostgresLogKey.endpoint: "\(configuration.redacted)"])
            return c
        } catch {
            core.backoff.failed()
            logger.warning("Postgres connection failed", metadata: [
                PostgresLogKey.endpoint: "\(configuration.redacted)", PostgresLogKey.error: "\(error.message)",
            ])
            throw error
        }
    }

    fileprivate func broken(_ core: AnyObject, _ error: PostgresError) {
        guard let core = core as? Core else { return }
        core.connection = nil
        core.backoff.failed()
        logger.warning("Postgres connection lost", metadata: [
            PostgresLogKey.endpoint: "\(configuration.redacted)", PostgresLogKey.error: "\(error.message)",
        ])
    }
}

/// Statements inside `PostgresClient.transaction`; valid only while its body runs.
public final class PostgresTransaction {
    private let connection: PostgresConnection
    private unowned let client: PostgresClient
    private let core: AnyObject
    fileprivate var valid = true

    fileprivate init(connection: PostgresConnection, client: PostgresClient, core: AnyObject) {
        self.connection = connection
        self.client = client
        self.core = core
    }

    /// Runs one statement inside the transaction.
    public func query(_ sql: String, _ binds: [PostgresBind] = []) throws(PostgresError) -> PostgresResult {
        guard valid else {
            throw PostgresError(code: .transaction, message: "a PostgresTransaction was used after its transaction body returned")
        }
        do {
            return try connection.exec(sql, binds)
        } catch {
            if error.isConnectionLoss { client.broken(core, error) }
            throw error
        }
    }
}
