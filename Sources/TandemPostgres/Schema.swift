import Postgres

/// The tables Tandem writes: Celery's own result table (created only when missing, with the columns every
/// Celery 5.x reader accepts) and Tandem's ledger. Migrations run under an advisory lock so workers that start
/// together do not race on CREATE TABLE.
public enum Schema {
    /// Bumped whenever a statement below changes; recorded in tandem_schema.
    public static let version = 1

    static let statements: [String] = [
        // Celery's DatabaseBackend model (celery.backends.database.models.Task / TaskExtended). `id` has no
        // default: SQLAlchemy inserts nextval('task_id_sequence') itself, and so does Tandem.
        "CREATE SEQUENCE IF NOT EXISTS task_id_sequence",
        """
        CREATE TABLE IF NOT EXISTS celery_taskmeta (
            id INTEGER NOT NULL PRIMARY KEY,
            task_id VARCHAR(155) UNIQUE,
            status VARCHAR(50),
            result BYTEA,
            date_done TIMESTAMP WITHOUT TIME ZONE,
            traceback TEXT,
            name VARCHAR(155),
            args BYTEA,
            kwargs BYTEA,
            worker VARCHAR(155),
            retries INTEGER,
            queue VARCHAR(155)
        )
        """,
        "CREATE SEQUENCE IF NOT EXISTS taskset_id_sequence",
        """
        CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
            id INTEGER NOT NULL PRIMARY KEY,
            taskset_id VARCHAR(155) UNIQUE,
            result BYTEA,
            date_done TIMESTAMP WITHOUT TIME ZONE
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS tandem_tasks (
            task_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            task_name TEXT,
            kind TEXT,
            ingress_queue TEXT,
            queue TEXT,
            datacenter TEXT,
            dispatched_at TIMESTAMPTZ,
            claimed_by TEXT,
            hostname TEXT,
            token BIGINT NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            pid INTEGER,
            started_at TIMESTAMPTZ,
            finished_at TIMESTAMPTZ,
            outcome TEXT,
            exit_status INTEGER,
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS tandem_task_events (
            id BIGSERIAL PRIMARY KEY,
            task_id TEXT NOT NULL,
            job_id TEXT,
            at TIMESTAMPTZ NOT NULL DEFAULT now(),
            event TEXT NOT NULL,
            worker TEXT,
            datacenter TEXT,
            token BIGINT,
            detail TEXT
        )
        """,
        "CREATE INDEX IF NOT EXISTS tandem_task_events_by_task ON tandem_task_events (task_id, id)",
        """
        CREATE TABLE IF NOT EXISTS tandem_spool_progress (
            spool_id TEXT PRIMARY KEY,
            applied BIGINT NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
        """,
        "CREATE TABLE IF NOT EXISTS tandem_schema (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    ]

    /// Creates what is missing. Safe to call from every process at start-up.
    public static func migrate(_ client: PostgresClient) async throws {
        try await client.transaction { tx in
            // 0x7461_6e64 = "tand": one lock id for all of Tandem's migrations
            _ = try tx.query("SELECT pg_advisory_xact_lock(1952542308)")
            for s in statements { _ = try tx.query(s) }
            let current = try tx.query("SELECT max(version) AS v FROM tandem_schema").rows.first?.int("v") ?? 0
            if current < Int64(version) {
                _ = try tx.query("INSERT INTO tandem_schema (version) VALUES ($1)", [.int(Int64(version))])
            }
        }
    }
}
