// Postgres module: see Protocol/SPEC.md for the architecture.
