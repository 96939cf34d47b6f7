//! The result of a run: per stage outcome, rows and timing, rendered as the end-of-run summary.

use std::time::Duration;

use crate::config::Stage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// The stage ran and committed (or had rows to check but nothing to change).
    Succeeded,
    /// Nothing new to process; the reason says why.
    UpToDate(String),
    /// The stage failed; its target is unchanged.
    Failed(String),
    /// Not run because the named upstream stage failed.
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct StageReport {
    pub stage: String,
    pub target: String,
    pub outcome: StageOutcome,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    pub rows_superseded: u64,
    /// Changes older than the key's state (late or re-delivered), skipped.
    pub rows_stale: u64,
    /// Deletes of keys the table did not hold, kept as tombstones.
    pub tombstones_added: u64,
    pub files_removed: u64,
    pub rows_dropped: u64,
    pub rows_quarantined: u64,
    /// Expectations, checks and the accounting identity, as evaluated on the candidate result.
    pub checks: Vec<crate::checks::CheckResult>,
    /// Files of the target a merge read (after pruning by key range).
    pub files_scanned: u64,
    /// What an incremental stage recomputed.
    pub scope: Option<String>,
    pub output_version: Option<u64>,
    pub elapsed: Duration,
    /// Non-fatal findings (warn expectations).
    pub warnings: Vec<String>,
}

impl StageReport {
    pub fn new(stage: &Stage, outcome: StageOutcome) -> StageReport {
        StageReport {
            stage: stage.name.clone(),
            target: stage.target.to_string(),
            outcome,
            rows_read: 0,
            rows_written: 0,
            rows_inserted: 0,
            rows_updated: 0,
            rows_deleted: 0,
            rows_superseded: 0,
            rows_stale: 0,
            tombstones_added: 0,
            files_removed: 0,
            files_scanned: 0,
            rows_dropped: 0,
            rows_quarantined: 0,
            checks: Vec::new(),
            scope: None,
            output_version: None,
            elapsed: Duration::ZERO,
            warnings: Vec::new(),
        }
    }

    pub fn skipped(stage: &Stage, failed_upstream: String) -> StageReport {
        StageReport::new(stage, StageOutcome::Skipped(failed_upstream))
    }

    pub fn status(&self) -> &'static str {
        match self.outcome {
            StageOutcome::Succeeded => "succeeded",
            StageOutcome::UpToDate(_) => "up_to_date",
            StageOutcome::Failed(_) => "failed",
            StageOutcome::Skipped(_) => "skipped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: String,
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub elapsed: Duration,
    /// Start of the run, microseconds since the epoch (UTC).
    pub started_micros: i64,
    /// How each notification went (filled after the stages, so not part of what is sent).
    pub notifications: Vec<crate::notify::Delivery>,
    /// Tables compacted after the run because they crossed the small-file threshold.
    pub maintained: Vec<crate::maintain::TableUpkeep>,
}

impl RunReport {
    /// Every stage succeeded (or had nothing to do).
    pub fn stages_succeeded(&self) -> bool {
        self.stages.iter().all(|s| {
            matches!(
                s.outcome,
                StageOutcome::Succeeded | StageOutcome::UpToDate(_)
            )
        })
    }

    /// The stages succeeded and no `required` notification failed.
    pub fn succeeded(&self) -> bool {
        self.stages_succeeded()
            && self
                .notifications
                .iter()
                .all(|n| n.delivered || !n.required)
    }

    pub fn status(&self) -> &'static str {
        if self.succeeded() {
            "succeeded"
        } else {
            "failed"
        }
    }

    pub fn count(&self, pick: impl Fn(&StageOutcome) -> bool) -> u64 {
        self.stages.iter().filter(|s| pick(&s.outcome)).count() as u64
    }

    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.stage == name)
    }

    /// The summary as one JSON object, for `--log-format json`.
    pub fn to_json(&self) -> serde_json::Value {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| {
                let message = match &s.outcome {
                    StageOutcome::Succeeded => None,
                    StageOutcome::UpToDate(m) | StageOutcome::Failed(m) => Some(m.clone()),
                    StageOutcome::Skipped(upstream) => {
                        Some(format!("upstream `{upstream}` failed"))
                    }
                };
                serde_json::json!({
                    "stage": s.stage,
                    "target": s.target,
                    "status": s.status(),
                    "rows_read": s.rows_read,
                    "rows_written": s.rows_written,
                    "rows_inserted": s.rows_inserted,
                    "rows_updated": s.rows_updated,
                    "rows_deleted": s.rows_deleted,
                    "rows_superseded": s.rows_superseded,
                    "rows_stale": s.rows_stale,
                    "tombstones_added": s.tombstones_added,
                    "files_removed": s.files_removed,
                    "files_scanned": s.files_scanned,
                    "rows_dropped": s.rows_dropped,
                    "rows_quarantined": s.rows_quarantined,
                    "checks": s.checks,
                    "scope": s.scope,
                    "version": s.output_version,
                    "elapsed_ms": s.elapsed.as_millis() as u64,
                    "message": message,
                    "warnings": s.warnings,
                })
            })
            .collect();
        let started = chrono::DateTime::from_timestamp_micros(self.started_micros);
        let finished = chrono::DateTime::from_timestamp_micros(
            self.started_micros + self.elapsed.as_micros() as i64,
        );
        let failed_checks: Vec<serde_json::Value> = self
            .stages
            .iter()
            .flat_map(|s| {
                s.checks
                    .iter()
                    .filter(|c| !c.passed)
                    .map(move |c| serde_json::json!({"stage": s.stage, "check": c}))
            })
            .collect();
        let written: serde_json::Map<String, serde_json::Value> = self
            .stages
            .iter()
            .filter_map(|s| Some((s.target.clone(), serde_json::json!(s.output_version?))))
            .collect();
        serde_json::json!({
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "logical_date": serde_json::Value::Null,
            "status": self.status(),
            "started_at": started.map(|t| t.to_rfc3339()),
            "finished_at": finished.map(|t| t.to_rfc3339()),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "stages": stages,
            "failed_checks": failed_checks,
            "versions_written": written,
            "notifications": self.notifications,
            "maintained": self.maintained,
        })
    }

    /// The end-of-run summary table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "run {} of `{}`: {} in {:.1}s\n",
            self.run_id,
            self.pipeline,
            self.status(),
            self.elapsed.as_secs_f64()
        );
        let width = self
            .stages
            .iter()
            .map(|s| s.stage.len())
            .max()
            .unwrap_or(5)
            .max(5);
        out.push_str(&format!(
            "  {:<width$}  {:<10}  {:>10}  {:>10}  {:>8}  {:>7}  note\n",
            "stage", "status", "rows read", "written", "version", "time"
        ));
        for delivery in self.notifications.iter().filter(|n| !n.delivered) {
            out.push_str(&format!(
                "  notification `{}` not delivered: {}\n",
                delivery.target,
                delivery.error.as_deref().unwrap_or("unknown error")
            ));
        }
        for stage in &self.stages {
            let note = match &stage.outcome {
                StageOutcome::Succeeded => {
                    let mut parts = Vec::new();
                    if stage.rows_updated
                        + stage.rows_deleted
                        + stage.rows_superseded
                        + stage.rows_stale
                        > 0
                    {
                        parts.push(format!(
                            "+{} ~{} -{} superseded {} stale {}",
                            stage.rows_inserted,
                            stage.rows_updated,
                            stage.rows_deleted,
                            stage.rows_superseded,
                            stage.rows_stale
                        ));
                    }
                    parts.extend(stage.scope.iter().cloned());
                    parts.extend(stage.warnings.iter().cloned());
                    parts.join("; ")
                }
                StageOutcome::UpToDate(reason) => std::iter::once(reason)
                    .chain(&stage.warnings)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join("; "),
                StageOutcome::Failed(message) => message.clone(),
                StageOutcome::Skipped(upstream) => format!("upstream `{upstream}` failed"),
            };
            out.push_str(&format!(
                "  {:<width$}  {:<10}  {:>10}  {:>10}  {:>8}  {:>6.1}s  {}\n",
                stage.stage,
                stage.status(),
                stage.rows_read,
                stage.rows_written,
                stage
                    .output_version
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                stage.elapsed.as_secs_f64(),
                note
            ));
        }
        out
    }
}
