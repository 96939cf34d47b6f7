//! Serde mirrors of the pipeline YAML, exactly as the user writes it. Nothing outside `config/` sees these
//! types: `validate.rs` compiles them into the checked model of `model.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Lake root: a directory (default `./lake`, relative to the working directory), `file:///...` or
    /// `s3://bucket/prefix`.
    #[serde(default)]
    pub lake: Option<String>,
    /// How to reach object storage, for an `s3://` lake or landing path.
    #[serde(default)]
    pub storage: Option<StorageSpec>,
    /// Free-form variables, available in SQL as `{{ name }}`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    /// Where to report the end of each run.
    #[serde(default)]
    pub notify: Vec<NotifySpec>,
    /// Table upkeep: compaction, vacuum and the promises that bound it.
    #[serde(default)]
    pub maintenance: Option<MaintenanceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000` for MinIO (default: AWS S3, or
    /// `AWS_ENDPOINT_URL`).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO expects. Default true.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Allow plain `http://` endpoints (a local MinIO). Default false.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Retries of a failed request, with exponential backoff (default 10).
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Give up retrying a request after this many seconds (default 180).
    #[serde(default)]
    pub retry_timeout_secs: Option<u64>,
    /// Run even where concurrent commits are not protected (a server without conditional writes).
    #[serde(default)]
    pub allow_unsafe_writes: bool,
    /// Further delta-rs / object_store options, passed as given (`aws_session_token`, `aws_profile`, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSpec {
    /// Versions of every table stay readable by time travel for at least this many days (default 7).
    #[serde(default)]
    pub time_travel_days: Option<u32>,
    /// Backfills may rewrite this many days back (default 0); vacuum keeps their inputs.
    #[serde(default)]
    pub backfill_days: Option<u32>,
    /// How long vacuum keeps unreferenced files (default: the larger of the two above).
    #[serde(default)]
    pub vacuum_retention_days: Option<u32>,
    /// Target size of compacted files in MiB (default 128).
    #[serde(default)]
    pub target_file_mb: Option<u64>,
    /// After a run, compact a written table that has more files than this (default 100; 0 turns it off).
    #[serde(default)]
    pub optimize_after_files: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub name: String,
    /// Run outcomes that notify: `success`, `failure` (default both).
    #[serde(default)]
    pub on: Option<Vec<String>>,
    /// Whether a failed delivery fails the run (default false: it is logged and recorded only).
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    #[serde(default)]
    pub sns: Option<SnsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    /// Extra headers; values usually come from `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Environment variable holding the HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Retries after the first attempt on 5xx, 429 and connection errors (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// First backoff in milliseconds, doubled each retry, with jitter (default 500).
    #[serde(default)]
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsSpec {
    pub topic_arn: String,
    #[serde(default)]
    pub region: Option<String>,
    /// For local or compatible endpoints, e.g. `http://127.0.0.1:5000`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    /// Folder holding the landing files (searched recursively, e.g. `YYYY/MM/DD/` date folders).
    pub path: String,
    #[serde(default)]
    pub format: Option<FormatSpec>,
    /// Whether CSV files start with a header row (DMS `AddColumnName`). Default true.
    #[serde(default)]
    pub header: Option<bool>,
    #[serde(default)]
    pub delimiter: Option<char>,
    /// The table's own columns, in file order, without the DMS `Op` / timestamp / change-seq columns.
    pub columns: Vec<String>,
    /// Key columns of the source table (documentation and validation only; CDC keys live on the stage).
    #[serde(default)]
    pub key: Vec<String>,
    /// AWS DMS layout: `LOAD*` full-load files then change files with an `Op` column.
    #[serde(default)]
    pub dms: Option<DmsSpec>,
    /// What a landing file that cannot be read does to the ingest: `fail` (default: the stage fails,
    /// nothing is landed), `quarantine` (the file is set aside under `<lake>/quarantine/files/` with its
    /// reason and the good files land), `skip` (the good files land; the bad one is recorded and ignored).
    #[serde(default)]
    pub on_bad_file: Option<BadFileSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadFileSpec {
    Fail,
    Quarantine,
    Skip,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatSpec {
    Csv,
    Parquet,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmsSpec {
    /// DMS `TimestampColumnName`, e.g. `dms_commit_ts`; follows `Op` in every file when set.
    #[serde(default)]
    pub timestamp_column: Option<String>,
    /// Whether full-load files carry `Op` too (DMS `IncludeOpForFullLoad`).
    #[serde(default)]
    pub include_op_for_full_load: bool,
    /// Whether change files end with the `$AR_H_CHANGE_SEQ` column (landed in Bronze as `change_seq`).
    #[serde(default)]
    pub change_seq: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LayerSpec {
    Bronze,
    Silver,
    Gold,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSpec {
    Append,
    Overwrite,
    Merge,
    Cdc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    pub layer: LayerSpec,
    #[serde(default)]
    pub description: Option<String>,
    /// SQL file (one SELECT), relative to the pipeline's project directory.
    #[serde(default)]
    pub sql: Option<String>,
    /// Source to land (Bronze stages), instead of `sql`.
    #[serde(default)]
    pub ingest: Option<String>,
    /// Target table as `layer.name`, stored at `<lake>/<layer>/<name>`.
    pub target: String,
    #[serde(default)]
    pub mode: Option<ModeSpec>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub sequence_by: Vec<String>,
    #[serde(default)]
    pub op: Option<OpSpec>,
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub expectations: Vec<ExpectationSpec>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// Columns to Z-order the target by when `medallion maintain --optimize` compacts it.
    #[serde(default)]
    pub zorder_by: Vec<String>,
    /// Column comments stored in the table's schema, shown by `describe` and other Delta readers.
    #[serde(default)]
    pub column_comments: BTreeMap<String, String>,
    /// The only columns given statistics (file skipping) when the target is created; default: every
    /// column (Bronze: its lineage columns).
    #[serde(default)]
    pub stats_columns: Option<Vec<String>>,
    /// The Parquet compression of the target's files, set when it is created: `zstd` (level 1, the
    /// default; Bronze: `snappy`), `zstd(<level>)`, `snappy`, `lz4`, `gzip` or `none`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Overwrite stages: recompute only the values of `column` that the changes to `source` touched,
    /// or only the rows of the `key` values it changed.
    #[serde(default)]
    pub incremental: Option<IncrementalSpec>,
    /// CDC stages, and overwrite stages refreshed by `incremental.key`: create the target with
    /// deletion vectors (`delta.enableDeletionVectors`), so that a change batch marks the rows it
    /// replaces or deletes instead of rewriting the files holding them.
    #[serde(default)]
    pub deletion_vectors: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSpec {
    /// Column of the stage's output (and of `source`) whose values are replaced, e.g. `txn_date`.
    #[serde(default)]
    pub column: Option<String>,
    /// Column of the stage's output holding `source`'s key, for a stage whose rows each come from one
    /// row of `source` (no join, aggregate or window): only the rows of the keys the source's changes
    /// touched are recomputed, e.g. `transaction_id`. One of `column` and `key`.
    #[serde(default)]
    pub key: Option<String>,
    /// The cdc table whose applied changes say which values to recompute, e.g. `silver.transactions`.
    pub source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSpec {
    pub column: String,
    #[serde(default)]
    pub delete: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectationSpec {
    pub name: String,
    /// Row-level SQL predicate over the stage's output; rows where it is not true violate it.
    pub expr: String,
    /// The column the expectation is about, named in error messages.
    #[serde(default)]
    pub column: Option<String>,
    #[serde(default)]
    pub action: Option<ActionSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionSpec {
    Warn,
    Drop,
    Quarantine,
    Fail,
}

/// A KPI or reconciliation check: a scalar SQL query over the stage's candidate result, compared with a
/// rule. Exactly one of `expect`, `equals` and `max_change_pct`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// One value: `SELECT COUNT(*) FROM candidate`; `candidate` is the target as it would be after the
    /// write, `batch` the rows this stage writes; other tables by `layer.name`.
    pub query: String,
    /// `> 0`, `>= 1`, `< 5`, `<= 5`, `= 0`, `!= 0`, or `between A and B`.
    #[serde(default)]
    pub expect: Option<String>,
    /// Reconciliation: a second scalar query the value must equal, within `tolerance`.
    #[serde(default)]
    pub equals: Option<String>,
    /// Absolute tolerance for `equals` (default 0: exact, to the cent).
    #[serde(default)]
    pub tolerance: Option<String>,
    /// The value may differ from the previous successful run's by at most this many percent.
    #[serde(default)]
    pub max_change_pct: Option<String>,
    #[serde(default)]
    pub severity: Option<SeveritySpec>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeveritySpec {
    Warn,
    Error,
}
