//! `medallion history`: the pipeline's recent runs from `<lake>/_medallion/runs`, with the checks that did
//! not pass in each, as a table or JSON.

use crate::{
    config::Pipeline,
    state::{RunRecord, StateError, StateStore},
};

/// One run and its unpassed checks.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub run: RunRecord,
    /// (stage, check, outcome, observed, threshold)
    pub checks: Vec<[String; 5]>,
    /// Notifications not delivered: (target, error).
    pub notifications: Vec<(String, String)>,
}

pub async fn recent(pipeline: &Pipeline, limit: usize) -> Result<Vec<HistoryEntry>, StateError> {
    let state = StateStore::new(&pipeline.lake);
    let mut entries = Vec::new();
    for run in state.recent_runs(&pipeline.name, limit).await? {
        let checks = state.unpassed_checks(&run.run_id).await?;
        let notifications = state.failed_notifications(&run.run_id).await?;
        entries.push(HistoryEntry {
            run,
            checks,
            notifications,
        });
    }
    Ok(entries)
}

fn timestamp(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

pub fn render(entries: &[HistoryEntry]) -> String {
    if entries.is_empty() {
        return "no runs recorded yet\n".into();
    }
    let mut out = format!(
        "{:<36}  {:<19}  {:>8}  {:<9}  {:>4} {:>4} {:>4} {:>4}  checks not passed, notifications not delivered\n",
        "run", "started (UTC)", "seconds", "status", "ok", "same", "fail", "skip"
    );
    for entry in entries {
        let run = &entry.run;
        let checks: Vec<String> = entry
            .checks
            .iter()
            .map(|[stage, check, outcome, observed, threshold]| {
                format!("{stage}.{check} {outcome} (observed {observed}, expected {threshold})")
            })
            .chain(
                entry
                    .notifications
                    .iter()
                    .map(|(target, error)| format!("notification {target} failed ({error})")),
            )
            .collect();
        out.push_str(&format!(
            "{:<36}  {:<19}  {:>8.1}  {:<9}  {:>4} {:>4} {:>4} {:>4}  {}\n",
            run.run_id,
            timestamp(run.started_micros),
            (run.finished_micros - run.started_micros) as f64 / 1e6,
            run.status,
            run.stages_succeeded,
            run.stages_up_to_date,
            run.stages_failed,
            run.stages_skipped,
            checks.join("; ")
        ));
    }
    out
}

pub fn to_json(entries: &[HistoryEntry]) -> serde_json::Value {
    serde_json::Value::Array(
        entries
            .iter()
            .map(|e| {
                let run = &e.run;
                serde_json::json!({
                    "run_id": run.run_id,
                    "pipeline": run.pipeline,
                    "status": run.status,
                    "started_at": timestamp(run.started_micros),
                    "finished_at": timestamp(run.finished_micros),
                    "stages_succeeded": run.stages_succeeded,
                    "stages_up_to_date": run.stages_up_to_date,
                    "stages_failed": run.stages_failed,
                    "stages_skipped": run.stages_skipped,
                    "checks_not_passed": e.checks.iter().map(|[stage, check, outcome, observed, threshold]| serde_json::json!({
                        "stage": stage, "check": check, "outcome": outcome, "observed": observed, "threshold": threshold,
                    })).collect::<Vec<_>>(),
                    "notifications_failed": e.notifications.iter().map(|(target, error)| serde_json::json!({
                        "target": target, "error": error,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
