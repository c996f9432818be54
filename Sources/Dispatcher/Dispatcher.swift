// Dispatcher module: see Protocol/SPEC.md for the architecture.
