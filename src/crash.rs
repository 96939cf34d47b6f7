//! Named crash points for the crash-consistency tests: when `MEDALLION_CRASH_AT` names a point, the
//! process aborts there, as a SIGKILL or a power cut would stop it. Never set in production; the points
//! sit where a crash is most likely to leave state half-done (between two commits).

/// The points, in the order a run meets them.
pub const POINTS: [&str; 5] = [
    "after_bronze_commit",
    "after_silver_commit",
    "before_gold_commit",
    "before_stage_history",
    "before_run_history",
];

/// Aborts the process if `MEDALLION_CRASH_AT` is `name`.
pub fn point(name: &str) {
    if std::env::var("MEDALLION_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("medallion: crash point `{name}` reached (MEDALLION_CRASH_AT); aborting");
        std::process::abort();
    }
}
