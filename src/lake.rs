//! The lake as a catalog, for people and tools looking at it: its Delta tables found by folder
//! (`<lake>/<layer>/<table>`), read with SQL at their latest version or by time travel (`medallion sql`),
//! and described with their files and commit history (`medallion describe`).

use std::io::Write;

use datafusion::arrow::{array::RecordBatch, util::pretty::pretty_format_batches};
use deltalake::DeltaTable;
use futures::StreamExt;

use crate::{
    config::TableName,
    delta::{self, DeltaError},
    engine::{self, EngineError},
    storage::{Location, StorageError},
};

/// Layers whose folders hold tables.
const LAYERS: [&str; 5] = ["bronze", "silver", "gold", "quarantine", "_medallion"];

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake `{0}` has no tables (is `--lake` or the pipeline's `lake:` right?)")]
    Empty(Location),
    #[error("no table `{table}` in lake `{lake}`; tables: {known}")]
    UnknownTable {
        table: String,
        lake: Location,
        known: String,
    },
    #[error("table `{table}`: cannot time travel: {message}")]
    TimeTravel { table: String, message: String },
    #[error(transparent)]
    Delta(Box<DeltaError>),
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error("cannot format the result: {0}")]
    Format(String),
    #[error("cannot list the tables of lake {0}")]
    Storage(StorageError),
}

impl From<DeltaError> for LakeError {
    fn from(error: DeltaError) -> Self {
        LakeError::Delta(Box::new(error))
    }
}

impl From<EngineError> for LakeError {
    fn from(error: EngineError) -> Self {
        LakeError::Engine(Box::new(error))
    }
}

fn unknown_table(lake: &Location, all: &[TableName], name: &str) -> LakeError {
    LakeError::UnknownTable {
        table: name.to_string(),
        lake: lake.clone(),
        known: all
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Which version of the tables a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsOf {
    Latest,
    Version(u64),
    /// RFC 3339 timestamp: the latest version committed at or before it.
    Timestamp(String),
}

/// Every table of the lake, by `layer.name`.
pub async fn tables(lake: &Location) -> Result<Vec<TableName>, LakeError> {
    let mut found = Vec::new();
    let Some(root) = lake.local_path() else {
        return remote_tables(lake).await;
    };
    for layer in LAYERS {
        let Ok(entries) = std::fs::read_dir(root.join(layer)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("_delta_log").is_dir()
                && let Some(table) = TableName::parse(&format!("{layer}.{name}"))
            {
                found.push(table);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The tables of a lake on object storage: one delimited LIST per layer, then one per candidate table
/// to see its `_delta_log/`.
async fn remote_tables(lake: &Location) -> Result<Vec<TableName>, LakeError> {
    let store = lake.store().map_err(LakeError::Storage)?;
    let failed = |e: object_store::Error| LakeError::Storage(lake.error(&e));
    let mut found = Vec::new();
    for layer in LAYERS {
        let listed = store
            .list_with_delimiter(Some(&object_store::path::Path::from(layer)))
            .await
            .map_err(failed)?;
        for folder in listed.common_prefixes {
            let Some(name) = folder.filename().map(str::to_string) else {
                continue;
            };
            let inside = store
                .list_with_delimiter(Some(&folder))
                .await
                .map_err(failed)?;
            let is_table = inside
                .common_prefixes
                .iter()
                .any(|p| p.filename() == Some("_delta_log"));
            if is_table && let Some(table) = TableName::parse(&format!("{layer}.{name}")) {
                found.push(table);
            }
        }
    }
    found.sort();
    Ok(found)
}

async fn open_as_of(
    table: &TableName,
    path: &Location,
    as_of: &AsOf,
) -> Result<DeltaTable, LakeError> {
    let travel = |message: String| LakeError::TimeTravel {
        table: table.to_string(),
        message,
    };
    let mut delta = delta::open(path)
        .await?
        .ok_or_else(|| travel("not a Delta table".into()))?;
    let latest = delta.version();
    if matches!(as_of, AsOf::Latest) {
        return Ok(delta);
    }
    // Where the log starts (once `maintain` cleaned it): a version or an instant is checked against
    // it before delta-rs tries it (which logs its own error in the kernel's words about files, or
    // reads the oldest version for an instant before it), and an error names it.
    let start = delta::history::log_start(path, &delta).await.ok().flatten();
    let loaded = match as_of {
        AsOf::Latest => return Ok(delta),
        AsOf::Version(version) if latest.is_some_and(|latest| *version > latest) => {
            Err(format!("version {version} is not written yet"))
        }
        AsOf::Version(version) if start.is_some_and(|(oldest, _)| *version < oldest) => {
            Err(format!(
                "version {version} is no longer in the table's log (cleaned by \
                 `maintain --vacuum` or another writer)"
            ))
        }
        AsOf::Version(version) => delta
            .load_version(*version as _)
            .await
            .map_err(|e| format!("version {version}: {e}")),
        AsOf::Timestamp(text) => {
            let at = chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| travel(format!("`{text}` is not an RFC 3339 timestamp: {e}")))?
                .with_timezone(&chrono::Utc);
            match start {
                Some((_, first)) if at < first => {
                    Err(format!("as of {text}: before the table's history"))
                }
                _ => delta
                    .load_with_datetime(at)
                    .await
                    .map_err(|e| format!("as of {text}: {e}")),
            }
        }
    };
    let Err(message) = loaded else {
        return Ok(delta);
    };
    // Say what the log holds instead: from its start to the latest.
    let readable = match start {
        Some((oldest, when)) => format!(
            "; the table's log holds versions {oldest} ({}) to {}",
            when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            latest.map_or("-".into(), |v| v.to_string()),
        ),
        None => String::new(),
    };
    Err(travel(format!("{message}{readable}")))
}

/// Runs `sql` over the lake's tables; the tables it names are read `as_of`, the others at their latest.
pub async fn query(
    lake: &Location,
    sql: &str,
    as_of: &AsOf,
) -> Result<Vec<RecordBatch>, LakeError> {
    let all = tables(lake).await?;
    if all.is_empty() {
        return Err(LakeError::Empty(lake.clone()));
    }
    let named: Vec<String> = engine::sql::table_references(sql).unwrap_or_default();
    let ctx = delta::session(None)?;
    engine::prepare(&ctx);
    for table in &all {
        let path = table.path_in(lake);
        let version = if named.contains(&table.to_string()) {
            as_of.clone()
        } else {
            AsOf::Latest
        };
        let delta = open_as_of(table, &path, &version).await?;
        let provider = delta::provider(&path, &delta).await?;
        engine::register_table(&ctx, table, provider, None)?;
    }
    for name in &named {
        if TableName::parse(name).is_some_and(|t| !all.contains(&t)) {
            return Err(unknown_table(lake, &all, name));
        }
    }
    let frame = engine::query(&ctx, "query", sql).await?;
    frame
        .collect()
        .await
        .map_err(|e| LakeError::from(EngineError::query("query", e)))
}

/// Output formats of `medallion sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Formats query results: an aligned table, CSV with a header, or JSON lines (one object per row;
/// decimals as strings so that no digit is lost).
pub fn format(batches: &[RecordBatch], format: Format) -> Result<String, LakeError> {
    let fail = |e: datafusion::arrow::error::ArrowError| LakeError::Format(e.to_string());
    match format {
        Format::Table => Ok(format!(
            "{}\n",
            pretty_format_batches(batches).map_err(fail)?
        )),
        Format::Csv => {
            let mut out = Vec::new();
            {
                let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for batch in batches {
                    writer.write(batch).map_err(fail)?;
                }
            }
            String::from_utf8(out).map_err(|e| LakeError::Format(e.to_string()))
        }
        Format::Json => {
            let mut out = Vec::new();
            {
                let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
                for batch in batches {
                    writer.write(batch).map_err(fail)?;
                }
                writer.finish().map_err(fail)?;
            }
            let _ = out.flush();
            String::from_utf8(out).map_err(|e| LakeError::Format(e.to_string()))
        }
    }
}

/// One commit of a table's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Commit {
    pub version: u64,
    pub timestamp: Option<String>,
    pub operation: Option<String>,
    pub run_id: Option<String>,
    pub stage: Option<String>,
}

/// What `medallion describe` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Description {
    pub table: String,
    pub path: String,
    pub version: Option<u64>,
    pub description: Option<String>,
    /// (name, type, nullable, comment)
    pub columns: Vec<(String, String, bool, Option<String>)>,
    pub partition_columns: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub properties: Vec<(String, String)>,
    pub history: Vec<Commit>,
}

pub async fn describe(
    lake: &Location,
    name: &str,
    history: usize,
) -> Result<Description, LakeError> {
    let all = tables(lake).await?;
    let table = TableName::parse(name)
        .filter(|t| all.contains(t))
        .ok_or_else(|| unknown_table(lake, &all, name))?;
    let path = table.path_in(lake);
    let delta = open_as_of(&table, &path, &AsOf::Latest).await?;
    let table_err = |e| DeltaError::Table {
        table: path.to_string(),
        source: e,
    };
    let snapshot = delta.snapshot().map_err(table_err)?;
    let metadata = snapshot.metadata();
    let schema = snapshot.schema();
    let columns = schema
        .fields()
        .map(|f| {
            let comment = f
                .metadata()
                .get("comment")
                .and_then(|v| serde_json::to_value(v).ok())
                .and_then(|v| v.as_str().map(String::from));
            (
                f.name().clone(),
                f.data_type().to_string(),
                f.is_nullable(),
                comment,
            )
        })
        .collect();
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut stream = delta.get_active_add_actions_by_partitions(&[]);
    while let Some(file) = stream.next().await {
        let file = file.map_err(table_err)?;
        files += 1;
        bytes += file.size().max(0) as u64;
    }
    let mut properties: Vec<(String, String)> = metadata
        .configuration()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    properties.sort();
    let version = delta.version();
    let mut commits = Vec::new();
    let mut log = delta.history(Some(history));
    let mut index = 0u64;
    while let Some(info) = log.next().await {
        let info = info.map_err(table_err)?;
        let text = |key: &str| {
            info.info
                .get(key)
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        commits.push(Commit {
            version: version.unwrap_or(0).saturating_sub(index),
            timestamp: info
                .timestamp
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339()),
            operation: info.operation.clone(),
            run_id: text("medallion.run_id"),
            stage: text("medallion.stage"),
        });
        index += 1;
    }
    Ok(Description {
        table: table.to_string(),
        path: path.to_string(),
        version,
        description: metadata.description().map(String::from),
        columns,
        partition_columns: metadata.partition_columns().to_vec(),
        files,
        bytes,
        properties,
        history: commits,
    })
}

impl Description {
    pub fn render(&self) -> String {
        let mut out = format!(
            "table {} at {} (version {})\n",
            self.table,
            self.path,
            self.version.map_or("-".into(), |v| v.to_string())
        );
        if let Some(description) = &self.description {
            out.push_str(&format!("  {description}\n"));
        }
        out.push_str("columns:\n");
        for (name, data_type, nullable, comment) in &self.columns {
            out.push_str(&format!(
                "  {name:<24} {data_type:<16} {}{}\n",
                if *nullable { "null    " } else { "not null" },
                comment
                    .as_ref()
                    .map(|c| format!("  -- {c}"))
                    .unwrap_or_default()
            ));
        }
        out.push_str(&format!(
            "partitioned by: {}\nfiles: {} ({:.1} MiB)\n",
            if self.partition_columns.is_empty() {
                "-".to_string()
            } else {
                self.partition_columns.join(", ")
            },
            self.files,
            self.bytes as f64 / (1024.0 * 1024.0)
        ));
        if !self.properties.is_empty() {
            out.push_str("properties:\n");
            for (key, value) in &self.properties {
                out.push_str(&format!("  {key} = {value}\n"));
            }
        }
        out.push_str("history (newest first):\n");
        for commit in &self.history {
            out.push_str(&format!(
                "  v{:<5} {:<25} {:<10} run {} stage {}\n",
                commit.version,
                commit.timestamp.as_deref().unwrap_or("-"),
                commit.operation.as_deref().unwrap_or("-"),
                commit.run_id.as_deref().unwrap_or("-"),
                commit.stage.as_deref().unwrap_or("-"),
            ));
        }
        out
    }
}
