/// Tandem's version: `--version` of every binary, each worker's heartbeat (`executorctl workers` shows it, so a
/// rolling upgrade shows which workers run what) and the processes' `*_info` metrics. Bumped with each release.
public enum TandemVersion {
    public static let current = "0.18.0"
}
