//! medallion's own state, kept as Delta tables under `<lake>/_medallion/` so that it is as durable and
//! readable as the data: the ledger of ingested landing files (`ingested_files`), one row per stage run
//! with the input versions it consumed (`stage_runs`, which doubles as the watermark store) and one row
//! per pipeline run (`runs`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray},
        compute::cast,
        datatypes::{DataType, Field, Schema},
    },
    prelude::SessionContext,
};

use crate::{
    delta::{self, CommitMeta, DeltaError, TableOptions},
    storage::Location,
};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("run state under `{path}`: {source}")]
    Delta { path: Location, source: DeltaError },
    #[error("run state table `{path}` cannot be read: {message}")]
    Read { path: Location, message: String },
}

/// One landing file in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub source: String,
    pub file: String,
    pub size: u64,
    pub modified_micros: i64,
    pub checksum: String,
    pub rows: u64,
    pub batch_id: i64,
    pub run_id: String,
}

/// The outcome of one stage in one run, as stored in `stage_runs`.
#[derive(Debug, Clone)]
pub struct StageRecord {
    pub run_id: String,
    pub pipeline: String,
    pub stage: String,
    pub target: String,
    pub status: String,
    pub started_micros: i64,
    pub finished_micros: i64,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    pub rows_superseded: u64,
    /// Delta version of each input table the stage consumed up to.
    pub input_versions: BTreeMap<String, u64>,
    pub output_version: Option<u64>,
    pub message: Option<String>,
}

/// One pipeline run, as stored in `runs`.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub status: String,
    pub started_micros: i64,
    pub finished_micros: i64,
    pub stages_succeeded: u64,
    pub stages_up_to_date: u64,
    pub stages_failed: u64,
    pub stages_skipped: u64,
}

/// A landing file an ingest set aside (`on_bad_file: quarantine | skip`).
#[derive(Debug, Clone)]
pub struct BadFileRecord {
    pub source: String,
    pub file: String,
    pub checksum: String,
    pub reason: String,
    pub policy: String,
    /// Where the quarantined copy is.
    pub kept_at: Option<String>,
}

/// One backfill unit (a pipeline, a logical date, a scope) as recorded in `backfill_units`.
#[derive(Debug, Clone)]
pub struct UnitRecord {
    pub pipeline: String,
    pub date: String,
    pub scope: String,
    pub code_hash: String,
    pub inputs_hash: String,
    pub status: String,
    pub run_id: String,
}

/// Ledger entries [`StateStore::record_touched`] updates in one commit.
const TOUCHED_PER_COMMIT: usize = 500;

pub struct StateStore {
    root: Location,
    /// Stages run in parallel and record into the same state tables; one write at a time keeps the
    /// first run's table creation and the appends from racing each other's commits.
    writes: tokio::sync::Mutex<()>,
}

impl StateStore {
    pub fn new(lake: &Location) -> StateStore {
        StateStore {
            root: lake.join("_medallion"),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    fn table(&self, name: &str) -> Location {
        self.root.join(name)
    }

    /// Ledger entries of `source`, by file name.
    pub async fn ingested_files(
        &self,
        source: &str,
    ) -> Result<HashMap<String, LedgerEntry>, StateError> {
        let rows = self
            .query(
                "ingested_files",
                &format!(
                    "SELECT source, file, size, modified_micros, checksum, rows, batch_id, run_id \
                     FROM state WHERE source = {}",
                    literal(source)
                ),
            )
            .await?;
        let mut entries = HashMap::new();
        for row in rows {
            let entry = LedgerEntry {
                source: row.text(0),
                file: row.text(1),
                size: row.int(2) as u64,
                modified_micros: row.int(3),
                checksum: row.text(4),
                rows: row.int(5) as u64,
                batch_id: row.int(6),
                run_id: row.text(7),
            };
            entries.insert(entry.file.clone(), entry);
        }
        Ok(entries)
    }

    pub async fn record_ingested(
        &self,
        entries: &[LedgerEntry],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "source",
                strings(entries.iter().map(|e| Some(e.source.as_str()))),
            ),
            (
                "file",
                strings(entries.iter().map(|e| Some(e.file.as_str()))),
            ),
            ("size", ints(entries.iter().map(|e| Some(e.size as i64)))),
            (
                "modified_micros",
                ints(entries.iter().map(|e| Some(e.modified_micros))),
            ),
            (
                "checksum",
                strings(entries.iter().map(|e| Some(e.checksum.as_str()))),
            ),
            ("rows", ints(entries.iter().map(|e| Some(e.rows as i64)))),
            ("batch_id", ints(entries.iter().map(|e| Some(e.batch_id)))),
            (
                "run_id",
                strings(entries.iter().map(|e| Some(e.run_id.as_str()))),
            ),
        ];
        self.append("ingested_files", columns, meta).await
    }

    /// Records the new modification times of ledger entries of `source` whose files were found with the
    /// content the ledger has for them (`(file, modified_micros)`: a copy job touched them), so that later
    /// runs know them unchanged by size and time again instead of reading them each time.
    pub async fn record_touched(
        &self,
        source: &str,
        touched: &[(String, i64)],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if touched.is_empty() {
            return Ok(());
        }
        let path = self.table("ingested_files");
        let _one_writer = self.writes.lock().await;
        // A few hundred files per commit keep each statement (and the predicate delta-rs writes into
        // the commit info) small when a copy job touched a whole landing folder.
        for chunk in touched.chunks(TOUCHED_PER_COMMIT) {
            let names: Vec<String> = chunk.iter().map(|(file, _)| literal(file)).collect();
            let times: String = chunk
                .iter()
                .map(|(file, micros)| {
                    format!(" WHEN {} THEN CAST({micros} AS BIGINT)", literal(file))
                })
                .collect();
            delta::update_rows(
                &path,
                &format!(
                    "source = {} AND file IN ({})",
                    literal(source),
                    names.join(", ")
                ),
                "modified_micros",
                &format!("CASE file{times} ELSE modified_micros END"),
                meta,
            )
            .await
            .map_err(|source| StateError::Delta {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Input versions of the stage's latest successful run that wrote or checked its target.
    pub async fn last_success(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> Result<Option<BTreeMap<String, u64>>, StateError> {
        let rows = self
            .query(
                "stage_runs",
                &format!(
                    "SELECT input_versions FROM state WHERE pipeline = {} AND stage = {} \
                     AND status = 'succeeded' ORDER BY finished_at DESC LIMIT 1",
                    literal(pipeline),
                    literal(stage)
                ),
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let versions = serde_json::from_str(&row.text(0)).map_err(|e| StateError::Read {
            path: self.table("stage_runs"),
            message: format!("bad input_versions: {e}"),
        })?;
        Ok(Some(versions))
    }

    /// Each check's observed value in the stage's latest successful run (for day-over-day checks).
    pub async fn last_check_values(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> Result<BTreeMap<String, String>, StateError> {
        let runs = self
            .query(
                "stage_runs",
                &format!(
                    "SELECT run_id FROM state WHERE pipeline = {} AND stage = {} \
                     AND status = 'succeeded' ORDER BY finished_at DESC LIMIT 1",
                    literal(pipeline),
                    literal(stage)
                ),
            )
            .await?;
        let Some(run) = runs.first() else {
            return Ok(BTreeMap::new());
        };
        let rows = self
            .query(
                "check_runs",
                &format!(
                    "SELECT check_name, observed FROM state WHERE stage = {} AND run_id = {}",
                    literal(stage),
                    literal(&run.text(0))
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| (r.text(0), r.text(1))).collect())
    }

    /// The latest `limit` runs of `pipeline`, newest first.
    pub async fn recent_runs(
        &self,
        pipeline: &str,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StateError> {
        let rows = self
            .query(
                "runs",
                &format!(
                    "SELECT run_id, pipeline, status, CAST(started_at AS BIGINT) AS started, CAST(finished_at AS BIGINT) AS finished, \
                     stages_succeeded, stages_up_to_date, stages_failed, stages_skipped FROM state \
                     WHERE pipeline = {} ORDER BY started_at DESC LIMIT {limit}",
                    literal(pipeline)
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RunRecord {
                run_id: r.text(0),
                pipeline: r.text(1),
                status: r.text(2),
                started_micros: r.int(3),
                finished_micros: r.int(4),
                stages_succeeded: r.int(5) as u64,
                stages_up_to_date: r.int(6) as u64,
                stages_failed: r.int(7) as u64,
                stages_skipped: r.int(8) as u64,
            })
            .collect())
    }

    /// Checks that did not pass in `run_id`: (stage, check, outcome, observed, threshold).
    pub async fn unpassed_checks(&self, run_id: &str) -> Result<Vec<[String; 5]>, StateError> {
        let rows = self
            .query(
                "check_runs",
                &format!(
                    "SELECT stage, check_name, outcome, observed, threshold FROM state \
                     WHERE run_id = {} AND outcome <> 'passed' ORDER BY stage, check_name",
                    literal(run_id)
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| [r.text(0), r.text(1), r.text(2), r.text(3), r.text(4)])
            .collect())
    }

    /// Records how each notification of a run went.
    pub async fn record_notifications(
        &self,
        run_id: &str,
        deliveries: &[crate::notify::Delivery],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("run_id", strings(deliveries.iter().map(|_| Some(run_id)))),
            (
                "target",
                strings(deliveries.iter().map(|d| Some(d.target.as_str()))),
            ),
            (
                "kind",
                strings(deliveries.iter().map(|d| Some(d.kind.as_str()))),
            ),
            (
                "outcome",
                strings(
                    deliveries
                        .iter()
                        .map(|d| Some(if d.delivered { "delivered" } else { "failed" })),
                ),
            ),
            (
                "attempts",
                ints(deliveries.iter().map(|d| Some(i64::from(d.attempts)))),
            ),
            (
                "error",
                strings(deliveries.iter().map(|d| d.error.as_deref())),
            ),
            (
                "recorded_at",
                timestamps(deliveries.iter().map(|_| now_micros())),
            ),
        ];
        self.append("notifications", columns, meta).await
    }

    /// Notifications of `run_id` that were not delivered: (target, error).
    pub async fn failed_notifications(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, String)>, StateError> {
        let rows = self
            .query(
                "notifications",
                &format!(
                    "SELECT target, error FROM state WHERE run_id = {} AND outcome = 'failed' ORDER BY target",
                    literal(run_id)
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| (r.text(0), r.text(1))).collect())
    }

    /// The latest record of a backfill unit.
    pub async fn last_unit(
        &self,
        pipeline: &str,
        date: &str,
        scope: &str,
    ) -> Result<Option<UnitRecord>, StateError> {
        let rows = self
            .query(
                "backfill_units",
                &format!(
                    "SELECT pipeline, unit_date, scope, code_hash, inputs_hash, status, run_id FROM state \
                     WHERE pipeline = {} AND unit_date = {} AND scope = {} ORDER BY recorded_at DESC LIMIT 1",
                    literal(pipeline),
                    literal(date),
                    literal(scope)
                ),
            )
            .await?;
        Ok(rows.first().map(|r| UnitRecord {
            pipeline: r.text(0),
            date: r.text(1),
            scope: r.text(2),
            code_hash: r.text(3),
            inputs_hash: r.text(4),
            status: r.text(5),
            run_id: r.text(6),
        }))
    }

    pub async fn record_unit(
        &self,
        unit: &UnitRecord,
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        let one = |v: &str| strings(std::iter::once(Some(v)));
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("pipeline", one(&unit.pipeline)),
            ("unit_date", one(&unit.date)),
            ("scope", one(&unit.scope)),
            ("code_hash", one(&unit.code_hash)),
            ("inputs_hash", one(&unit.inputs_hash)),
            ("status", one(&unit.status)),
            ("run_id", one(&unit.run_id)),
            ("recorded_at", timestamps(std::iter::once(now_micros()))),
        ];
        self.append("backfill_units", columns, meta).await
    }

    /// (file, checksum) of the files of `source` set aside by earlier runs.
    pub async fn bad_files(
        &self,
        source: &str,
    ) -> Result<std::collections::HashSet<(String, String)>, StateError> {
        let rows = self
            .query(
                "bad_files",
                &format!(
                    "SELECT file, checksum FROM state WHERE source = {}",
                    literal(source)
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| (r.text(0), r.text(1))).collect())
    }

    pub async fn record_bad_files(
        &self,
        run_id: &str,
        records: &[BadFileRecord],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("run_id", strings(records.iter().map(|_| Some(run_id)))),
            (
                "source",
                strings(records.iter().map(|r| Some(r.source.as_str()))),
            ),
            (
                "file",
                strings(records.iter().map(|r| Some(r.file.as_str()))),
            ),
            (
                "checksum",
                strings(records.iter().map(|r| Some(r.checksum.as_str()))),
            ),
            (
                "reason",
                strings(records.iter().map(|r| Some(r.reason.as_str()))),
            ),
            (
                "policy",
                strings(records.iter().map(|r| Some(r.policy.as_str()))),
            ),
            (
                "kept_at",
                strings(records.iter().map(|r| r.kept_at.as_deref())),
            ),
            (
                "recorded_at",
                timestamps(records.iter().map(|_| now_micros())),
            ),
        ];
        self.append("bad_files", columns, meta).await
    }

    /// Records how each check of a stage came out.
    pub async fn record_checks(
        &self,
        run_id: &str,
        stage: &str,
        results: &[crate::checks::CheckResult],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if results.is_empty() {
            return Ok(());
        }
        let same = |v: &str| strings(results.iter().map(|_| Some(v)));
        let outcome = |r: &crate::checks::CheckResult| {
            if r.passed {
                "passed"
            } else if r.blocks() {
                "failed"
            } else {
                "warned"
            }
        };
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("run_id", same(run_id)),
            ("stage", same(stage)),
            (
                "check_name",
                strings(results.iter().map(|r| Some(r.name.as_str()))),
            ),
            (
                "kind",
                strings(results.iter().map(|r| Some(r.kind.as_str()))),
            ),
            (
                "severity",
                strings(results.iter().map(|r| Some(r.severity.as_str()))),
            ),
            (
                "observed",
                strings(results.iter().map(|r| Some(r.observed.as_str()))),
            ),
            (
                "threshold",
                strings(results.iter().map(|r| Some(r.threshold.as_str()))),
            ),
            ("outcome", strings(results.iter().map(|r| Some(outcome(r))))),
            (
                "recorded_at",
                timestamps(results.iter().map(|_| now_micros())),
            ),
        ];
        self.append("check_runs", columns, meta).await
    }

    pub async fn record_stages(
        &self,
        records: &[StageRecord],
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        let versions: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(&r.input_versions).unwrap_or_default())
            .collect();
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "run_id",
                strings(records.iter().map(|r| Some(r.run_id.as_str()))),
            ),
            (
                "pipeline",
                strings(records.iter().map(|r| Some(r.pipeline.as_str()))),
            ),
            (
                "stage",
                strings(records.iter().map(|r| Some(r.stage.as_str()))),
            ),
            (
                "target",
                strings(records.iter().map(|r| Some(r.target.as_str()))),
            ),
            (
                "status",
                strings(records.iter().map(|r| Some(r.status.as_str()))),
            ),
            (
                "started_at",
                timestamps(records.iter().map(|r| r.started_micros)),
            ),
            (
                "finished_at",
                timestamps(records.iter().map(|r| r.finished_micros)),
            ),
            (
                "rows_read",
                ints(records.iter().map(|r| Some(r.rows_read as i64))),
            ),
            (
                "rows_written",
                ints(records.iter().map(|r| Some(r.rows_written as i64))),
            ),
            (
                "rows_inserted",
                ints(records.iter().map(|r| Some(r.rows_inserted as i64))),
            ),
            (
                "rows_updated",
                ints(records.iter().map(|r| Some(r.rows_updated as i64))),
            ),
            (
                "rows_deleted",
                ints(records.iter().map(|r| Some(r.rows_deleted as i64))),
            ),
            (
                "rows_superseded",
                ints(records.iter().map(|r| Some(r.rows_superseded as i64))),
            ),
            (
                "input_versions",
                strings(versions.iter().map(|v| Some(v.as_str()))),
            ),
            (
                "output_version",
                ints(records.iter().map(|r| r.output_version.map(|v| v as i64))),
            ),
            (
                "message",
                strings(records.iter().map(|r| r.message.as_deref())),
            ),
        ];
        self.append("stage_runs", columns, meta).await
    }

    pub async fn record_run(&self, run: &RunRecord, meta: &CommitMeta) -> Result<(), StateError> {
        let one = |v: &str| strings(std::iter::once(Some(v)));
        let int = |v: u64| ints(std::iter::once(Some(v as i64)));
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("run_id", one(&run.run_id)),
            ("pipeline", one(&run.pipeline)),
            ("status", one(&run.status)),
            (
                "started_at",
                timestamps(std::iter::once(run.started_micros)),
            ),
            (
                "finished_at",
                timestamps(std::iter::once(run.finished_micros)),
            ),
            ("stages_succeeded", int(run.stages_succeeded)),
            ("stages_up_to_date", int(run.stages_up_to_date)),
            ("stages_failed", int(run.stages_failed)),
            ("stages_skipped", int(run.stages_skipped)),
        ];
        self.append("runs", columns, meta).await
    }

    async fn append(
        &self,
        name: &str,
        columns: Vec<(&str, ArrayRef)>,
        meta: &CommitMeta,
    ) -> Result<(), StateError> {
        let path = self.table(name);
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect();
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .map_err(|e| StateError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let _one_writer = self.writes.lock().await;
        delta::append_batches(&path, vec![batch], &TableOptions::default(), meta)
            .await
            .map(|_| ())
            .map_err(|source| StateError::Delta { path, source })
    }

    /// Runs `sql` against the state table `name` (registered as `state`); no table gives no rows.
    async fn query(&self, name: &str, sql: &str) -> Result<Vec<Row>, StateError> {
        let path = self.table(name);
        let delta_err = |source| StateError::Delta {
            path: path.clone(),
            source,
        };
        let Some(table) = delta::open(&path).await.map_err(delta_err)? else {
            return Ok(Vec::new());
        };
        let read = |message: String| StateError::Read {
            path: path.clone(),
            message,
        };
        let ctx = SessionContext::new();
        let provider = delta::provider(&path, &table).await.map_err(delta_err)?;
        ctx.register_table("state", provider)
            .map_err(|e| read(e.to_string()))?;
        let batches = ctx
            .sql(sql)
            .await
            .map_err(|e| read(e.to_string()))?
            .collect()
            .await
            .map_err(|e| read(e.to_string()))?;
        let mut rows = Vec::new();
        for batch in batches {
            let columns: Vec<ArrayRef> = batch
                .columns()
                .iter()
                .map(|c| {
                    let target = if c.data_type().is_integer() {
                        DataType::Int64
                    } else {
                        DataType::Utf8
                    };
                    cast(c, &target)
                })
                .collect::<Result<_, _>>()
                .map_err(|e| read(e.to_string()))?;
            for index in 0..batch.num_rows() {
                rows.push(Row {
                    values: columns
                        .iter()
                        .map(|c| {
                            if let Some(s) = c.as_any().downcast_ref::<StringArray>() {
                                Value::Text(s.is_valid(index).then(|| s.value(index).to_string()))
                            } else if let Some(i) = c.as_any().downcast_ref::<Int64Array>() {
                                Value::Int(i.is_valid(index).then(|| i.value(index)))
                            } else {
                                Value::Text(None)
                            }
                        })
                        .collect(),
                });
            }
        }
        Ok(rows)
    }
}

enum Value {
    Text(Option<String>),
    Int(Option<i64>),
}

struct Row {
    values: Vec<Value>,
}

impl Row {
    fn text(&self, index: usize) -> String {
        match self.values.get(index) {
            Some(Value::Text(Some(s))) => s.clone(),
            Some(Value::Int(Some(i))) => i.to_string(),
            _ => String::new(),
        }
    }

    fn int(&self, index: usize) -> i64 {
        match self.values.get(index) {
            Some(Value::Int(Some(i))) => *i,
            Some(Value::Text(Some(s))) => s.parse().unwrap_or(0),
            _ => 0,
        }
    }
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn ints(values: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(values.collect::<Int64Array>())
}

fn timestamps(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(
        values
            .map(Some)
            .collect::<TimestampMicrosecondArray>()
            .with_timezone("UTC"),
    )
}

/// A SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Microseconds since the epoch, now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Where the tombstones of a cdc table's deleted keys live: `<lake>/_medallion/tombstones/<layer>/<table>`.
pub fn tombstones_path(lake: &Location, table: &crate::config::TableName) -> Location {
    table.path_in(&lake.join("_medallion").join("tombstones"))
}
