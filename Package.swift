// swift-tools-version:6.0
// Tandem: runs Apache Airflow's Celery tasks across datacenters without Celery workers.
import PackageDescription

let package = Package(
    name: "Tandem",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "swift-worker", targets: ["swift-worker"]),
        .executable(name: "swift-dispatcher", targets: ["swift-dispatcher"]),
        .executable(name: "executorctl", targets: ["executorctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),  // LogHandler.log(event:)
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
    ],
    targets: [
        // C layers: Debian's libhiredis-dev (0.14) and libpq-dev.
        .systemLibrary(name: "CHiredis", pkgConfig: "hiredis", providers: [.apt(["libhiredis-dev"])]),
        .systemLibrary(name: "CLibpq", pkgConfig: "libpq", providers: [.apt(["libpq-dev"])]),

        // Clients: the only code that touches redisContext* / PGconn*; ClientSupport holds what both share (and
        // the event-loop thread that drives their sockets in the worker and the dispatcher).
        .target(name: "CEventLoop"),
        // TLS for Redis (rediss://) on OpenSSL (libssl-dev): hiredis 0.14 has none (see redistls.h).
        .target(name: "CRedisTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        .target(name: "ClientSupport", dependencies: ["CEventLoop"]),
        .target(name: "Redis", dependencies: ["CHiredis", "CRedisTLS", "ClientSupport", .product(name: "Logging", package: "swift-log")]),
        .target(name: "Postgres", dependencies: ["CLibpq", "ClientSupport", .product(name: "Logging", package: "swift-log")]),

        // Pure code: wire format and domain. No C modules here.
        .target(name: "CeleryWire"),
        .target(name: "TandemCore", dependencies: ["CeleryWire", "Yams"]),

        // Adapters: the Redis broker and the Postgres result store + ledger.
        .target(
            name: "TandemRedis",
            dependencies: ["TandemCore", "CeleryWire", "Redis", "ClientSupport", .product(name: "Logging", package: "swift-log")],
            resources: [.copy("Scripts")]
        ),
        .target(
            name: "TandemPostgres",
            dependencies: ["TandemCore", "CeleryWire", "Postgres", "ClientSupport", .product(name: "Logging", package: "swift-log")]
        ),

        // fork+exec with a parent-death signal and its own process group (posix_spawn cannot set PDEATHSIG).
        .target(name: "CSpawn"),

        // Runtimes.
        .target(
            name: "Worker",
            dependencies: [
                "TandemCore", "TandemRedis", "TandemPostgres", "CeleryWire", "CSpawn", "ClientSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Dispatcher",
            dependencies: ["TandemCore", "TandemRedis", "ClientSupport", .product(name: "Logging", package: "swift-log")]
        ),

        // What the three executables share: flag/environment resolution, opening the stores, signals, logging.
        .target(
            name: "Setup",
            dependencies: [
                "TandemCore", "TandemRedis", "TandemPostgres", "Redis", "Postgres", "CeleryWire", "ClientSupport", "AirflowConfig",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // Operator surface: a small HTTP server (probes, metrics, Airflow's log endpoint) and Prometheus metrics.
        .target(name: "HTTPServer", dependencies: [.product(name: "Logging", package: "swift-log")]),
        .target(
            name: "Observability",
            dependencies: [
                "HTTPServer", "Worker", "Dispatcher", "TandemCore", "ClientSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // Airflow integration: the fork runner's launcher, the worker log server, Celery remote control
        // (revoke/ping) and airflow.cfg reading.
        .target(
            name: "AirflowRunner",
            dependencies: ["Worker", "CeleryWire", "TandemCore", .product(name: "Logging", package: "swift-log")]
        ),
        .target(name: "LogServer", dependencies: ["HTTPServer", .product(name: "Logging", package: "swift-log")]),
        .target(
            name: "Pidbox",
            dependencies: ["Worker", "CeleryWire", "Redis", "TandemRedis", .product(name: "Logging", package: "swift-log")]
        ),
        .target(name: "AirflowConfig"),

        // Thin executables.
        .executableTarget(
            name: "swift-worker",
            dependencies: [
                "Worker", "Setup", "Observability", "AirflowRunner", "LogServer", "Pidbox", "AirflowConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "swift-dispatcher",
            dependencies: ["Dispatcher", "ClientSupport", "Setup", "Observability", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "executorctl",
            dependencies: [
                "TandemCore", "TandemRedis", "TandemPostgres", "CeleryWire", "Setup",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // Tests: unit (no servers), clients and integration (real Redis/Postgres), interop (real Python).
        .target(
            name: "TestSupport",
            dependencies: [
                "Redis", "Postgres", "ClientSupport", "CeleryWire", "CSpawn", "TandemRedis",
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tests/TestSupport"
        ),
        .testTarget(name: "CeleryWireTests", dependencies: ["CeleryWire"], resources: [.copy("vectors")]),
        .testTarget(name: "TandemCoreTests", dependencies: ["TandemCore"]),
        .testTarget(name: "ClientTests", dependencies: ["Redis", "Postgres", "ClientSupport", "TestSupport", "Worker"]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "TandemCore", "TandemRedis", "TandemPostgres", "Worker", "Dispatcher", "CeleryWire", "ClientSupport", "TestSupport",
            ]
        ),
        // Chaos: real processes killed, frozen and restarted; prints submitted/completed/lost/duplicates/drain time.
        .testTarget(
            name: "ChaosTests",
            dependencies: ["TandemCore", "TandemRedis", "CeleryWire", "Redis", "Postgres", "TestSupport",
                .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(
            name: "ObservabilityTests",
            dependencies: [
                "Observability", "HTTPServer", "Setup", "Worker", "Dispatcher", "TandemCore", "CeleryWire", "Redis",
                "TandemRedis", "ClientSupport", "TestSupport", .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "ExecutorctlTests",
            dependencies: [
                "CeleryWire", "Redis", "Postgres", "TandemCore", "TandemRedis", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "AirflowTests",
            dependencies: [
                "AirflowRunner", "LogServer", "Pidbox", "AirflowConfig", "HTTPServer", "Worker", "CeleryWire", "Redis",
                "Postgres", "Setup", "TestSupport", .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: ["TandemCore", "TandemRedis", "TandemPostgres", "CeleryWire", "TestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// Release builds of Tandem's own Swift modules inline and specialise across module boundaries (the worker's path
// crosses CeleryWire, TandemCore, Redis, Postgres and Worker). Measured with Benchmarks/diag_switches.py, 4
// alternated pairs at c=2: worker loop busy 38.9–39.7% → 37.7–37.9%, worker CPU median 0.533 → 0.513 ms per task.
// (Dependencies are left as they come; C targets take no Swift flags.)
let cTargets: Set<String> = ["CHiredis", "CLibpq", "CSpawn", "CEventLoop", "CRedisTLS"]
for target in package.targets where (target.type == .regular || target.type == .executable) && !cTargets.contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-cross-module-optimization"], .when(configuration: .release))]
}
