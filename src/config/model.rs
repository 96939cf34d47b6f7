//! The checked pipeline model that the rest of medallion runs on. Every value here has been validated:
//! files exist, names are unique, SQL parses, the stage graph is acyclic.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use crate::{dag::Graph, storage::Location};

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub description: Option<String>,
    /// The YAML file this pipeline was loaded from.
    pub file: PathBuf,
    /// Directory that SQL paths are relative to (the parent of `pipelines/`, or the YAML's folder).
    pub project_dir: PathBuf,
    pub lake: Location,
    pub vars: BTreeMap<String, String>,
    pub sources: Vec<Source>,
    /// Stages in declaration order; `graph` node `i` is `stages[i]`.
    pub stages: Vec<Stage>,
    pub graph: Graph,
    pub notify: Vec<NotifyTarget>,
    pub maintenance: Maintenance,
}

/// Table upkeep settings (see `maintenance:` in the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub time_travel_days: u32,
    pub backfill_days: u32,
    pub vacuum_retention_days: u32,
    pub target_file_bytes: u64,
    pub optimize_after_files: u64,
}

impl Maintenance {
    /// The shortest vacuum retention the pipeline's promises allow, in days.
    pub fn minimum_retention_days(&self) -> u32 {
        self.time_travel_days.max(self.backfill_days)
    }
}

impl Default for Maintenance {
    fn default() -> Maintenance {
        Maintenance {
            time_travel_days: 7,
            backfill_days: 0,
            vacuum_retention_days: 7,
            target_file_bytes: 128 * 1024 * 1024,
            optimize_after_files: 100,
        }
    }
}

/// A place to report the end of a run.
#[derive(Clone)]
pub struct NotifyTarget {
    pub name: String,
    /// `success`, `failure`.
    pub on: Vec<String>,
    pub required: bool,
    pub kind: NotifyKind,
}

/// Header values and URLs may hold secrets, so targets never print them.
impl fmt::Debug for NotifyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            NotifyKind::Webhook(_) => "webhook",
            NotifyKind::Sns(_) => "sns",
        };
        f.debug_struct("NotifyTarget")
            .field("name", &self.name)
            .field("on", &self.on)
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub enum NotifyKind {
    Webhook(WebhookTarget),
    Sns(SnsTarget),
}

#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub secret_env: Option<String>,
    pub timeout: std::time::Duration,
    pub retries: u32,
    pub backoff: std::time::Duration,
}

#[derive(Clone)]
pub struct SnsTarget {
    pub topic_arn: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

impl Pipeline {
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Delta table location of `table` under the lake root.
    pub fn table_path(&self, table: &TableName) -> Location {
        table.path_in(&self.lake)
    }
}

/// A table name `layer.name`, stored at `<lake>/<layer>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn parse(text: &str) -> Option<TableName> {
        let (schema, table) = text.split_once('.')?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        (valid(schema) && valid(table)).then(|| TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    pub fn path_in(&self, lake: &Location) -> Location {
        lake.join(&self.schema).join(&self.table)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub path: Location,
    pub format: FileFormat,
    pub header: bool,
    pub delimiter: u8,
    pub columns: Vec<String>,
    pub key: Vec<String>,
    pub dms: Option<DmsLayout>,
    pub on_bad_file: BadFilePolicy,
}

/// What an unreadable landing file does to its ingest (see `on_bad_file:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFilePolicy {
    Fail,
    Quarantine,
    Skip,
}

impl BadFilePolicy {
    pub fn name(self) -> &'static str {
        match self {
            BadFilePolicy::Fail => "fail",
            BadFilePolicy::Quarantine => "quarantine",
            BadFilePolicy::Skip => "skip",
        }
    }
}

impl Source {
    /// Columns of the Bronze table that lands this source, before the lineage columns.
    pub fn bronze_columns(&self) -> Vec<String> {
        let mut columns = Vec::new();
        if let Some(dms) = &self.dms {
            columns.push(DmsLayout::OP_COLUMN.to_string());
            if let Some(ts) = &dms.timestamp_column {
                columns.push(ts.clone());
            }
        }
        columns.extend(self.columns.iter().cloned());
        if self.dms.as_ref().is_some_and(|d| d.change_seq) {
            columns.push(DmsLayout::CHANGE_SEQ_COLUMN.to_string());
        }
        columns
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Csv,
    Parquet,
    /// A small lookup file read whole: an object of `key: value` pairs (two columns) or an array of
    /// objects keyed by column name.
    Json,
}

#[derive(Debug, Clone)]
pub struct DmsLayout {
    pub timestamp_column: Option<String>,
    pub include_op_for_full_load: bool,
    pub change_seq: bool,
}

impl DmsLayout {
    /// Bronze name of DMS's `Op` column (lowercase, so SQL needs no quoting).
    pub const OP_COLUMN: &'static str = "op";
    /// DMS's own header name for the operation column.
    pub const OP_HEADER: &'static str = "Op";
    /// Bronze name of DMS's `$AR_H_CHANGE_SEQ` column.
    pub const CHANGE_SEQ_COLUMN: &'static str = "change_seq";
    pub const CHANGE_SEQ_HEADER: &'static str = "$AR_H_CHANGE_SEQ";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub layer: Layer,
    pub description: Option<String>,
    pub input: StageInput,
    pub target: TableName,
    pub write: WriteMode,
    pub partition_by: Vec<String>,
    pub expectations: Vec<Expectation>,
    /// KPI and reconciliation checks on the candidate result, before it is published.
    pub checks: Vec<Check>,
    pub zorder_by: Vec<String>,
    pub column_comments: BTreeMap<String, String>,
    /// The only columns the target keeps statistics for (`delta.dataSkippingStatsColumns`), set when
    /// it is created; `None`: every column (Bronze: its lineage columns).
    pub stats_columns: Option<Vec<String>>,
    /// The Parquet compression of the target's files, set when it is created; `None`: the layer's
    /// default (zstd level 1; Bronze: snappy).
    pub compression: Option<crate::delta::Codec>,
    /// For overwrite stages: recompute only what the source's changes touched.
    pub incremental: Option<Incremental>,
    /// CDC stages and keyed incremental stages: the target is created with deletion vectors
    /// (`delta.enableDeletionVectors`).
    pub deletion_vectors: bool,
}

/// An overwrite stage that recomputes only what the changes applied to `source` (a cdc table) since the
/// stage's last success touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incremental {
    pub by: IncrementalBy,
    pub source: TableName,
}

/// What an incremental stage recomputes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncrementalBy {
    /// The rows whose value of this column was touched. The cdc stage records, in each commit, the
    /// values of the column before and after every change it applied, so a change that moves a row
    /// from one value to another recomputes both.
    Column(String),
    /// The rows whose value of this column (the source's key) was changed: the stage maps each source
    /// row to at most one row, so the rows of other keys stay as they are (`delta::keyed`).
    Key(String),
}

impl Incremental {
    /// The column whose touched values are recomputed, for a stage incremental by column.
    pub fn column(&self) -> Option<&str> {
        match &self.by {
            IncrementalBy::Column(column) => Some(column),
            IncrementalBy::Key(_) => None,
        }
    }

    /// The output column holding the source's key, for a stage incremental by key.
    pub fn key(&self) -> Option<&str> {
        match &self.by {
            IncrementalBy::Key(key) => Some(key),
            IncrementalBy::Column(_) => None,
        }
    }
}

impl Stage {
    /// Tables this stage reads (empty for an ingest stage).
    pub fn reads(&self) -> &[TableName] {
        match &self.input {
            StageInput::Ingest { .. } => &[],
            StageInput::Sql { reads, .. } => reads,
        }
    }
}

#[derive(Debug, Clone)]
pub enum StageInput {
    /// Land the named source's new files into the target (Bronze).
    Ingest { source: String },
    /// Run one SELECT; `text` has `{{ vars }}` already substituted.
    Sql {
        file: PathBuf,
        text: String,
        reads: Vec<TableName>,
    },
}

#[derive(Debug, Clone)]
pub enum WriteMode {
    Append,
    Overwrite,
    /// Upsert on `keys`: matched rows updated, others inserted.
    Merge {
        keys: Vec<String>,
    },
    /// Apply a change stream: last change per key by `sequence_by` wins; `op` rows marked delete remove it.
    Cdc {
        keys: Vec<String>,
        sequence_by: Vec<String>,
        op_column: String,
        delete_values: Vec<String>,
        /// Columns whose touched values each commit records, for downstream incremental stages.
        track: Vec<String>,
    },
}

impl WriteMode {
    pub fn name(&self) -> &'static str {
        match self {
            WriteMode::Append => "append",
            WriteMode::Overwrite => "overwrite",
            WriteMode::Merge { .. } => "merge",
            WriteMode::Cdc { .. } => "cdc",
        }
    }

    /// Whether the stage consumes only the rows its append-only inputs gained since its last success.
    pub fn is_incremental(&self) -> bool {
        !matches!(self, WriteMode::Overwrite)
    }
}

#[derive(Debug, Clone)]
pub struct Expectation {
    pub name: String,
    pub expr: String,
    pub column: Option<String>,
    pub action: ExpectationAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectationAction {
    /// Count the violations; write every row.
    Warn,
    /// Leave violating rows out.
    Drop,
    /// Leave violating rows out and keep them, with the reason, in `<lake>/quarantine/<table>`.
    Quarantine,
    /// Stop the stage before anything is written.
    Fail,
}

impl ExpectationAction {
    pub fn name(self) -> &'static str {
        match self {
            ExpectationAction::Warn => "warn",
            ExpectationAction::Drop => "drop",
            ExpectationAction::Quarantine => "quarantine",
            ExpectationAction::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub query: String,
    pub rule: CheckRule,
    pub severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Reported; the stage still publishes.
    Warn,
    /// The stage publishes nothing and its downstream is skipped.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckRule {
    Compare {
        op: CompareOp,
        value: rust_decimal::Decimal,
    },
    Between {
        low: rust_decimal::Decimal,
        high: rust_decimal::Decimal,
    },
    /// Equal to another query's value within an absolute tolerance.
    Equals {
        query: String,
        tolerance: rust_decimal::Decimal,
    },
    /// Within this many percent of the previous successful run's value.
    MaxChangePct(rust_decimal::Decimal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl CompareOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
        }
    }

    pub fn holds(self, left: rust_decimal::Decimal, right: rust_decimal::Decimal) -> bool {
        match self {
            CompareOp::Gt => left > right,
            CompareOp::Ge => left >= right,
            CompareOp::Lt => left < right,
            CompareOp::Le => left <= right,
            CompareOp::Eq => left == right,
            CompareOp::Ne => left != right,
        }
    }
}

/// Parses an `expect:` rule: `> 0`, `>= 1.5`, `= 0`, `between -10 and 10`.
pub fn parse_expect(text: &str) -> Result<CheckRule, String> {
    use std::str::FromStr;
    let text = text.trim();
    let number = |s: &str| {
        rust_decimal::Decimal::from_str(s.trim())
            .map_err(|_| format!("`{}` is not a number", s.trim()))
    };
    let lower = text.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("between ") {
        let (low, high) = rest
            .split_once(" and ")
            .ok_or_else(|| format!("`{text}`: write `between A and B`"))?;
        return Ok(CheckRule::Between {
            low: number(low)?,
            high: number(high)?,
        });
    }
    for (symbol, op) in [
        (">=", CompareOp::Ge),
        ("<=", CompareOp::Le),
        ("!=", CompareOp::Ne),
        (">", CompareOp::Gt),
        ("<", CompareOp::Lt),
        ("=", CompareOp::Eq),
    ] {
        if let Some(rest) = text.strip_prefix(symbol) {
            return Ok(CheckRule::Compare {
                op,
                value: number(rest)?,
            });
        }
    }
    Err(format!(
        "`{text}`: expected `> N`, `>= N`, `< N`, `<= N`, `= N`, `!= N` or `between A and B`"
    ))
}
