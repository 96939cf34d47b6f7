//! Delta Lake tables through delta-rs: opening and creating tables, a DataFusion provider to read them, and
//! one file per write mode (append, overwrite, merge, cdc). Every write is a single Delta commit, so a
//! failure before it leaves the table at its previous version. Nothing here knows about YAML or stages.

mod append;
mod cdc;
mod deletion_vectors;
mod file_writer;
mod files;
mod first_load;
pub mod history;
pub mod keyed;
mod merge;
mod overwrite;
mod slices;
mod split_scan;
mod vector_scan;

use std::{collections::HashMap, sync::Arc};

use datafusion::{arrow::datatypes::SchemaRef, catalog::TableProvider};
use deltalake::{
    DeltaTable, DeltaTableError, TableProperty,
    kernel::engine::arrow_conversion::TryIntoKernel,
    open_table_with_storage_options,
    operations::create::CreateBuilder,
    parquet::file::properties::{WriterProperties, WriterPropertiesBuilder},
    protocol::SaveMode,
};

use crate::storage::{Location, StorageError};

pub use append::{BatchAppender, append_batches, append_frame};
pub use cdc::{
    CdcMetrics, CdcSpec, PreparedChanges, Touched, apply_changes, create_empty, holds_files,
    is_delete_sql, prepare_changes, touched_since,
};
pub use deletion_vectors::deletion_vectors_enabled;
pub use files::MIN_EARLY_FINISH_BYTES;
pub use first_load::{FirstLoad, LoadCopy, LoadSummary, StagedLoad};
pub use merge::upsert;
pub use overwrite::{Replacement, Scope, Staged, overwrite};
pub use slices::{SLICE_ROWS, Slices};

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("table `{table}`: {source}")]
    Table {
        table: String,
        source: DeltaTableError,
    },
    #[error("table `{table}`: {message}")]
    Invalid { table: String, message: String },
    #[error("table `{table}`: {source}")]
    Query {
        table: String,
        source: datafusion::error::DataFusionError,
    },
    #[error("table `{table}`: {source}")]
    Storage { table: String, source: StorageError },
    #[error("table `{table}`: another writer committed first")]
    Conflict { table: String },
}

impl DeltaError {
    /// A delta-rs failure on the table at `path`; storage failures (credentials, missing bucket,
    /// unreachable endpoint, throttling) are explained in words a user can act on.
    fn table(path: &Location, source: DeltaTableError) -> DeltaError {
        match source {
            DeltaTableError::ObjectStore { source } => DeltaError::Storage {
                table: path.to_string(),
                source: path.error(&source),
            },
            source => DeltaError::Table {
                table: path.to_string(),
                source,
            },
        }
    }

    /// A query over the table at `path` that failed.
    pub(crate) fn query(path: &Location, source: datafusion::error::DataFusionError) -> DeltaError {
        DeltaError::Query {
            table: path.to_string(),
            source,
        }
    }
}

/// What one write did. `version` is `None` when nothing was committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteMetrics {
    pub version: Option<u64>,
    /// Rows the write consumed (its source), when the write reports it separately from rows written.
    pub rows_source: Option<u64>,
    pub rows_written: u64,
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    pub files_added: u64,
}

/// Opens the table at `path` at its latest version, or `None` when there is no Delta table there yet.
pub async fn open(path: &Location) -> Result<Option<DeltaTable>, DeltaError> {
    let exists = match path.local_path() {
        Some(local) => local.join("_delta_log").is_dir(),
        // One LIST instead of a failed open, which delta-rs would log as an error.
        None => crate::storage::any_under(&path.join("_delta_log"))
            .await
            .map_err(|source| DeltaError::Storage {
                table: path.to_string(),
                source,
            })?,
    };
    if !exists {
        return Ok(None);
    }
    let url = path.url().map_err(|source| DeltaError::Storage {
        table: path.to_string(),
        source,
    })?;
    match open_table_with_storage_options(url, path.delta_options()).await {
        Ok(table) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) | Err(DeltaTableError::InvalidTableLocation(_)) => {
            Ok(None)
        }
        Err(e) => Err(DeltaError::table(path, e)),
    }
}

/// Sets `column` to `value` (a SQL expression) in the rows of the table at `path` that match
/// `predicate` (SQL), in one commit with `meta`'s lineage; nothing when there is no table. delta-rs
/// rewrites each file that holds a matching row: for medallion's small state tables.
pub async fn update_rows(
    path: &Location,
    predicate: &str,
    column: &str,
    value: &str,
    meta: &CommitMeta,
) -> Result<(), DeltaError> {
    let Some(table) = open(path).await? else {
        return Ok(());
    };
    let properties = table_writer_properties(&table);
    table
        .update()
        .with_predicate(predicate)
        .with_update(column, value)
        .with_writer_properties(properties)
        .with_commit_properties(meta.properties())
        .await
        .map(|_| ())
        .map_err(|e| DeltaError::table(path, e))
}

/// Latest version of the table at `path`, if it exists.
pub async fn version(path: &Location) -> Result<Option<u64>, DeltaError> {
    Ok(open(path).await?.and_then(|t| t.version()))
}

/// Options for a table medallion creates.
#[derive(Debug, Clone, Default)]
pub struct TableOptions {
    pub partition_by: Vec<String>,
    pub description: Option<String>,
    /// Columns created NOT NULL (e.g. merge keys).
    pub not_null: Vec<String>,
    /// Column comments, stored as the `comment` metadata of the schema's fields.
    pub comments: std::collections::BTreeMap<String, String>,
    /// Data files are cut at about this many bytes (`None`: 128 MiB).
    pub target_file_size: Option<u64>,
    /// The only columns given statistics (`delta.dataSkippingStatsColumns`, and Parquet's min and max
    /// with it); `None`: every column. Set when the table is created.
    pub stats_columns: Option<Vec<String>>,
    /// The Parquet compression of the table's files ([`COMPRESSION_PROPERTY`]); `None`: zstd level 1.
    /// Set when the table is created.
    pub compression: Option<Codec>,
    /// Created with deletion vectors (`delta.enableDeletionVectors`): a CDC batch then marks the rows
    /// it replaces or deletes ([`deletion_vectors`]) instead of rewriting their files.
    pub deletion_vectors: bool,
    /// The days of history the pipeline promises (its vacuum retention): the table is created with
    /// retention properties that keep them for every Delta tool ([`history::properties`]). `None`:
    /// Delta's defaults. Either way only `maintain` cleans the table's log.
    pub history_days: Option<u32>,
}

/// The table property that keeps a table's Parquet compression, so that every later write (appends,
/// merges, rebuilds, `maintain`) uses the codec the table was created with. Delta readers ignore
/// properties they do not know; each file names its codec.
pub const COMPRESSION_PROPERTY: &str = "medallion.parquet.compression";

/// A Parquet compression codec that Delta readers decode: `zstd` (level 1 unless given, `zstd(3)`),
/// `snappy`, `lz4` (LZ4_RAW: Spark reads it from 3.5, parquet-mr 1.13), `gzip` (level 6 unless given)
/// or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec(deltalake::parquet::basic::Compression);

impl Codec {
    /// Snappy.
    pub const SNAPPY: Codec = Codec(deltalake::parquet::basic::Compression::SNAPPY);

    /// What a table without [`COMPRESSION_PROPERTY`] is written with: zstd level 1. Every Delta reader
    /// decodes it; files two thirds the size of snappy's, and within 2% of level 3's at 10% less CPU
    /// for the whole Bronze write (BENCHMARKS.md).
    pub fn zstd() -> Codec {
        use deltalake::parquet::basic::{Compression, ZstdLevel};
        Codec(Compression::ZSTD(ZstdLevel::default()))
    }

    /// The Parquet codec.
    pub fn compression(self) -> deltalake::parquet::basic::Compression {
        self.0
    }
}

impl std::str::FromStr for Codec {
    type Err = String;

    /// Parses what a pipeline names (`zstd`, `zstd(3)`, `snappy`, `lz4`, `gzip`, `gzip(9)`, `none`) or
    /// [`Codec`]'s own `Display` (what the table property keeps): a name, then at most a level of
    /// digits in parentheses.
    fn from_str(text: &str) -> Result<Codec, String> {
        use deltalake::parquet::basic::{Compression, GzipLevel, ZstdLevel};
        let text = text.trim().to_ascii_lowercase();
        let (name, level) = match text.split_once('(') {
            None => (text.as_str(), None),
            Some((name, rest)) => {
                let level = rest
                    .strip_suffix(')')
                    .filter(|l| {
                        !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|l| l.parse::<u32>().ok());
                match level {
                    Some(level) => (name, Some(level)),
                    None => return Err(codec_error(&text, "a level is digits in parentheses")),
                }
            }
        };
        let parsed = match (name, level) {
            ("zstd", None) => Ok(Codec::zstd().0),
            ("zstd", Some(level)) => i32::try_from(level)
                .map_err(|e| e.to_string())
                .and_then(|l| ZstdLevel::try_new(l).map_err(|e| e.to_string()))
                .map(Compression::ZSTD),
            ("gzip", level) => GzipLevel::try_new(level.unwrap_or(6))
                .map(Compression::GZIP)
                .map_err(|e| e.to_string()),
            ("snappy", None) => Ok(Compression::SNAPPY),
            ("lz4" | "lz4_raw", None) => Ok(Compression::LZ4_RAW),
            ("none" | "uncompressed", None) => Ok(Compression::UNCOMPRESSED),
            // Codecs some readers lack: the deprecated Hadoop LZ4, LZO, Brotli.
            ("lzo" | "brotli", _) => Err("not every Delta reader decodes it".to_string()),
            ("snappy" | "lz4" | "lz4_raw" | "none" | "uncompressed", Some(_)) => {
                Err("it takes no level".to_string())
            }
            _ => Err("unknown codec".to_string()),
        };
        parsed
            .map(Codec)
            .map_err(|problem| codec_error(&text, &problem))
    }
}

/// Why `text` is not a [`Codec`].
fn codec_error(text: &str, problem: &str) -> String {
    format!(
        "`{text}` is not a compression medallion writes ({problem}); use zstd, zstd(<1-22>), snappy, \
         lz4, gzip, gzip(<0-9>) or none"
    )
}

impl std::fmt::Display for Codec {
    /// The codec as the table property keeps it: `zstd(1)`, `snappy`, `lz4_raw`, `gzip(6)`, `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use deltalake::parquet::basic::Compression;
        match self.0 {
            Compression::ZSTD(level) => write!(f, "zstd({})", level.compression_level()),
            Compression::GZIP(level) => write!(f, "gzip({})", level.compression_level()),
            Compression::SNAPPY => f.write_str("snappy"),
            Compression::LZ4_RAW => f.write_str("lz4_raw"),
            Compression::UNCOMPRESSED => f.write_str("none"),
            other => write!(f, "{other}"),
        }
    }
}

/// Parquet settings of every file medallion writes to `table`: its codec ([`compression`]), page-level
/// statistics for pruning, and the encodings of [`properties_builder`].
pub fn writer_properties(table: &DeltaTable) -> WriterProperties {
    properties_builder(&table_integer_columns(table), compression(table)).build()
}

/// The codec `table` is written with: its [`COMPRESSION_PROPERTY`], or zstd level 1 ([`Codec::zstd`])
/// without one (or with one this version cannot read).
pub fn compression(table: &DeltaTable) -> Codec {
    table
        .snapshot()
        .ok()
        .and_then(|s| {
            s.metadata()
                .configuration()
                .get(COMPRESSION_PROPERTY)
                .and_then(|text| text.parse().ok())
        })
        .unwrap_or_else(Codec::zstd)
}

/// [`writer_properties`] for files of `table`: when the table names its statistics columns
/// (`delta.dataSkippingStatsColumns`), the other columns get no Parquet min and max either. Computing
/// them compares every value with its page's bounds, a tenth of a Bronze landing's CPU for raw strings
/// that no reader filters on.
pub fn table_writer_properties(table: &DeltaTable) -> WriterProperties {
    statistics_properties(
        stats_columns(table).as_deref(),
        &table_integer_columns(table),
        compression(table),
    )
}

/// [`writer_properties`] with statistics for `columns` only, or for every column (`None`),
/// `DELTA_BINARY_PACKED` for the columns named in `integers`, and `codec`.
fn statistics_properties(
    columns: Option<&[String]>,
    integers: &[String],
    codec: Codec,
) -> WriterProperties {
    use deltalake::parquet::{file::properties::EnabledStatistics, schema::types::ColumnPath};
    let Some(columns) = columns else {
        return properties_builder(integers, codec).build();
    };
    columns
        .iter()
        .fold(
            properties_builder(integers, codec).set_statistics_enabled(EnabledStatistics::None),
            |builder, column| {
                builder.set_column_statistics_enabled(
                    ColumnPath::from(column.as_str()),
                    EnabledStatistics::Page,
                )
            },
        )
        .build()
}

/// The dictionary of a column chunk is given up for its remaining values at this size (Parquet's
/// default: 1 MiB). A column of few distinct values (a city, a channel, a client) stays far below it;
/// one of mostly distinct values (a key, a timestamp, a raw amount) otherwise hashes its first 1 MiB of
/// values into a dictionary it then drops. With this limit and the integers' encoding below, writing
/// the reference pipeline's Silver takes a quarter less CPU, in 7% smaller files (BENCHMARKS.md, item
/// 37).
const DICTIONARY_PAGE_LIMIT: usize = 128 * 1024;

/// Encodings: a dictionary per column chunk while it stays under [`DICTIONARY_PAGE_LIMIT`], then
/// `DELTA_BINARY_PACKED` for the columns in `integers` (keys, dates and timestamps, which are often
/// near-sorted: a few bits per value where PLAIN takes eight) and PLAIN for the others. Every Delta
/// reader decodes both (Spark's vectorized reader since 3.3).
fn properties_builder(integers: &[String], codec: Codec) -> WriterPropertiesBuilder {
    use deltalake::parquet::{
        basic::Encoding, file::properties::EnabledStatistics, schema::types::ColumnPath,
    };
    let builder = WriterProperties::builder()
        .set_compression(codec.compression())
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_LIMIT);
    integers.iter().fold(builder, |builder, column| {
        builder.set_column_encoding(
            ColumnPath::from(column.as_str()),
            Encoding::DELTA_BINARY_PACKED,
        )
    })
}

/// The columns of `table` that Parquet stores as integers (see [`integer_columns`]); none when its
/// schema cannot be read.
fn table_integer_columns(table: &DeltaTable) -> Vec<String> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    let schema: Option<datafusion::arrow::datatypes::Schema> = table
        .snapshot()
        .ok()
        .and_then(|snapshot| snapshot.schema().as_ref().try_into_arrow().ok());
    schema.map(|s| integer_columns(&s)).unwrap_or_default()
}

/// The top-level columns of `schema` that Parquet stores as integers: integers, dates and timestamps
/// (not decimals: with its amounts delta-packed, the reference pipeline's Silver took 1% more space).
fn integer_columns(schema: &datafusion::arrow::datatypes::Schema) -> Vec<String> {
    use datafusion::arrow::datatypes::DataType;
    schema
        .fields()
        .iter()
        .filter(|f| {
            matches!(
                f.data_type(),
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32
                    | DataType::Date32
                    | DataType::Date64
                    | DataType::Timestamp(_, _)
            )
        })
        .map(|f| f.name().clone())
        .collect()
}

/// The columns `table` keeps statistics for, when it names them.
pub fn stats_columns(table: &DeltaTable) -> Option<Vec<String>> {
    let snapshot = table.snapshot().ok()?;
    let columns = snapshot
        .metadata()
        .configuration()
        .get(TableProperty::DataSkippingStatsColumns.as_ref())?;
    Some(parse_stats_columns(columns))
}

/// The value of `delta.dataSkippingStatsColumns` naming `columns`: comma-separated, a name other than
/// letters, digits and `_` in backticks (a backtick in it doubled), as Delta writes it.
fn format_stats_columns(columns: &[String]) -> String {
    let plain = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            && !c.starts_with(|ch: char| ch.is_ascii_digit())
    };
    columns
        .iter()
        .map(|c| {
            if plain(c) {
                c.clone()
            } else {
                format!("`{}`", c.replace('`', "``"))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The column names of a `delta.dataSkippingStatsColumns` value (see [`format_stats_columns`]): commas
/// inside backticks belong to the name.
fn parse_stats_columns(text: &str) -> Vec<String> {
    let mut columns = Vec::new();
    let mut name = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match ch {
            '`' if quoted && chars.peek() == Some(&'`') => {
                chars.next();
                name.push('`');
            }
            '`' => quoted = !quoted,
            ',' if !quoted => columns.push(std::mem::take(&mut name)),
            // Spaces around names are not part of them.
            ch if ch.is_whitespace() && !quoted => {}
            ch => name.push(ch),
        }
    }
    columns.push(name);
    columns.retain(|c| !c.is_empty());
    columns
}

/// `schema` as a new table stores it: strings as one type, the column comments in the fields'
/// metadata, nullable unless named in `options.not_null`.
fn stored_schema(
    schema: &SchemaRef,
    options: &TableOptions,
) -> datafusion::arrow::datatypes::Schema {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| {
            let field = f.as_ref().clone();
            let mut field = field.with_data_type(normalize_type(f.data_type()));
            if let Some(comment) = options.comments.get(f.name()) {
                let mut metadata = field.metadata().clone();
                metadata.insert("comment".to_string(), comment.clone());
                field = field.with_metadata(metadata);
            }
            field.with_nullable(!options.not_null.contains(f.name()))
        })
        .collect();
    datafusion::arrow::datatypes::Schema::new(fields)
}

/// Creates an empty table with `schema`, unless one exists; returns it either way.
pub async fn create_if_missing(
    path: &Location,
    schema: &SchemaRef,
    options: &TableOptions,
) -> Result<DeltaTable, DeltaError> {
    if let Some(table) = open(path).await? {
        return Ok(table);
    }
    if let Some(unknown) = options
        .stats_columns
        .iter()
        .flatten()
        .find(|c| schema.field_with_name(c).is_err())
    {
        return Err(DeltaError::Invalid {
            table: path.to_string(),
            message: format!(
                "`stats_columns` names `{unknown}`, which is not a column of the table (columns: {})",
                column_list(schema)
            ),
        });
    }
    let arrow_schema = stored_schema(schema, options);
    let kernel: deltalake::kernel::StructType =
        (&arrow_schema)
            .try_into_kernel()
            .map_err(|e| DeltaError::Invalid {
                table: path.to_string(),
                message: format!("schema cannot be stored in Delta: {e}"),
            })?;
    if let Some(local) = path.local_path() {
        std::fs::create_dir_all(local).map_err(|e| DeltaError::Invalid {
            table: path.to_string(),
            message: format!("cannot create the table folder: {e}"),
        })?;
    }
    let url = path.url().map_err(|source| DeltaError::Storage {
        table: path.to_string(),
        source,
    })?;
    let mut builder = CreateBuilder::new()
        .with_location(url.as_str())
        .with_storage_options(path.delta_options())
        .with_columns(kernel.fields().cloned())
        .with_partition_columns(options.partition_by.clone())
        .with_configuration_property(TableProperty::CheckpointInterval, Some("20"))
        .with_save_mode(SaveMode::Ignore)
        // Creating is version 0 or nothing: a create that lost the race to another writer must not be
        // retried as a later metadata change (that would fail every writer based on version 0).
        .with_commit_properties(
            deltalake::kernel::transaction::CommitProperties::default().with_max_retries(0),
        );
    if let Some(name) = path.name() {
        builder = builder.with_table_name(name);
    }
    if let Some(description) = &options.description {
        builder = builder.with_comment(description);
    }
    if let Some(columns) = &options.stats_columns {
        builder = builder.with_configuration_property(
            TableProperty::DataSkippingStatsColumns,
            Some(format_stats_columns(columns)),
        );
    }
    // The log is cleaned by `maintain --vacuum` alone, by the rule that keeps promised versions.
    for (property, value) in history::properties(options.history_days) {
        builder = builder.with_configuration_property(property, Some(value));
    }
    if options.deletion_vectors {
        // The property also puts the `deletionVectors` feature in the table's protocol.
        builder =
            builder.with_configuration_property(TableProperty::EnableDeletionVectors, Some("true"));
    }
    if let Some(codec) = options.compression {
        // A property of medallion's own, which delta-rs refuses unless told to keep it.
        builder = builder
            .with_configuration([(COMPRESSION_PROPERTY, Some(codec.to_string()))])
            .with_raise_if_key_not_exists(false);
    }
    match builder.await {
        Ok(table) => Ok(table),
        // Another writer created the table between our look and our create: use theirs.
        Err(error) => match open(path).await {
            Ok(Some(table)) => Ok(table),
            _ => Err(DeltaError::table(path, error)),
        },
    }
}

fn column_list(schema: &SchemaRef) -> String {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    names.join(", ")
}

/// Whether `written` (a query's result) has the columns of `stored` (a table's schema), by name and
/// type, in order: the table takes its rows as they are. The log keeps partition columns in place.
fn same_columns(
    stored: &datafusion::arrow::datatypes::Schema,
    written: &datafusion::arrow::datatypes::Schema,
) -> bool {
    stored.fields().len() == written.fields().len()
        && stored.fields().iter().zip(written.fields()).all(|(s, w)| {
            s.name() == w.name() && normalize_type(s.data_type()) == normalize_type(w.data_type())
        })
}

/// Delta stores strings as one type; view and large strings from DataFusion are stored as plain strings.
fn normalize_type(
    data_type: &datafusion::arrow::datatypes::DataType,
) -> datafusion::arrow::datatypes::DataType {
    use datafusion::arrow::datatypes::DataType;
    match data_type {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        other => other.clone(),
    }
}

/// A DataFusion provider reading `table` at its loaded version. A table with deletion vectors is read
/// by DataFusion's Parquet scan with each vector as its file's row selection ([`vector_scan`]), or,
/// when its files do not hold its columns as they are, as shares of its files side by side
/// ([`split_scan`]).
pub async fn provider(
    path: &Location,
    table: &DeltaTable,
) -> Result<Arc<dyn TableProvider>, DeltaError> {
    if let Some(scan) = vector_scan::scan(path, table).await? {
        return Ok(scan);
    }
    if let Some(split) = split_scan::split(path, table).await? {
        return Ok(split);
    }
    table
        .table_provider()
        .await
        .map_err(|e| DeltaError::query(path, e))
}

/// One data file of a table's snapshot as a read sees it: the file, and its deletion vector if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LiveFile {
    /// The file's scan id (its URL), as [`files_provider`] takes it.
    pub id: String,
    /// What tells the file's deletion vector apart from any other (`None` without one).
    pub vector: Option<String>,
}

/// The files of `table` at its loaded version. A file never changes once written, and a deletion
/// vector is a new file too: a `LiveFile` names the rows a read of it returns for as long as it is live.
pub fn live_files(path: &Location, table: &DeltaTable) -> Result<Vec<LiveFile>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let root = files::root_url(table);
    snapshot
        .log_data()
        .into_iter()
        .map(|view| {
            let id = files::scan_id(path, &root, &view.path())?.to_string();
            let vector = view.deletion_vector_descriptor().map(|v| {
                format!(
                    "{:?}:{}:{:?}",
                    v.storage_type, v.path_or_inline_dv, v.offset
                )
            });
            Ok(LiveFile { id, vector })
        })
        .collect()
}

/// A table's live files (scan ids, in the log's order) split in two by what a write changes.
#[derive(Debug, PartialEq)]
pub struct FileSplit {
    /// The files no row the write changes can be in, as the log's statistics tell.
    pub whole: Vec<String>,
    /// The others.
    pub cut: Vec<String>,
}

/// The files of `table` split by `predicate` (over `schema`, the table's): `whole`, those no row
/// matching it can be in; `cut`, the others, among them any without statistics for its columns.
pub fn files_by_predicate(
    path: &Location,
    table: &DeltaTable,
    predicate: &datafusion::logical_expr::Expr,
    schema: SchemaRef,
) -> Result<FileSplit, DeltaError> {
    use datafusion::{
        common::DFSchema, logical_expr::simplify::SimplifyContext,
        optimizer::simplify_expressions::ExprSimplifier,
        physical_optimizer::pruning::PruningPredicateBuilder,
    };
    let query = |e| DeltaError::query(path, e);
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let frame = Arc::new(DFSchema::try_from(schema.as_ref().clone()).map_err(query)?);
    // Simplified first: the pruning predicate takes `x < a OR x > b`, not `NOT x BETWEEN a AND b`.
    let context = SimplifyContext::builder()
        .with_schema(frame.clone())
        .build();
    let predicate = ExprSimplifier::new(context)
        .simplify(predicate.clone())
        .map_err(query)?;
    let physical = datafusion::prelude::SessionContext::new()
        .create_physical_expr(predicate, &frame)
        .map_err(query)?;
    let pruning = PruningPredicateBuilder::new()
        .with_file_schema(schema)
        .try_build(physical)
        .map_err(query)?;
    let may_match = pruning.prune(&snapshot.log_data()).map_err(query)?;
    let mut split = FileSplit {
        whole: Vec::new(),
        cut: Vec::new(),
    };
    for (file, may) in live_files(path, table)?.into_iter().zip(may_match) {
        if may {
            split.cut.push(file.id)
        } else {
            split.whole.push(file.id)
        }
    }
    Ok(split)
}

/// A provider reading only the files `only` (scan ids, as [`live_files`] gives them) of `table`, as
/// [`provider`] reads them all; `None` for a table with deletion vectors that the vector scan cannot
/// read (delta-rs's own reader of such a table is what [`split_scan`] works around).
pub async fn files_provider(
    path: &Location,
    table: &DeltaTable,
    only: &[String],
) -> Result<Option<Arc<dyn TableProvider>>, DeltaError> {
    if let Some(scan) = vector_scan::scan_files(path, table, Some(only)).await? {
        return Ok(Some(scan));
    }
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    if vector_scan::has_deletion_vectors(snapshot) {
        return Ok(None);
    }
    let provider = table
        .table_provider()
        .with_file_paths(only.iter().cloned())
        .build()
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    Ok(Some(Arc::new(provider)))
}

/// The session used for Delta writes: DataFusion with delta-rs's planner, SQL identifiers folded to lower
/// case as in standard SQL. With `memory_limit` (bytes), execution memory is bounded: operators that can
/// spill (sorts, joins, aggregations) spill to disk past it, the others fail with "Resources exhausted".
pub fn session(
    memory_limit: Option<usize>,
) -> Result<datafusion::prelude::SessionContext, DeltaError> {
    let Some(limit) = memory_limit else {
        return session_on(None);
    };
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(limit, 1.0)
        .build_arc()
        .map_err(|e| session_failed(&e))?;
    session_on(Some(runtime))
}

/// As [`session`], executing on `runtime` (a query's own, so that a write keeps its memory bound).
pub(crate) fn session_on(
    runtime: Option<Arc<datafusion::execution::runtime_env::RuntimeEnv>>,
) -> Result<datafusion::prelude::SessionContext, DeltaError> {
    let overrides = HashMap::from([
        (
            "datafusion.sql_parser.enable_ident_normalization".to_string(),
            "true".to_string(),
        ),
        // A join side known to be under 10 MiB is hashed once and the other side streamed past it, as
        // Spark broadcasts tables under 10 MB. DataFusion's default of 1 MiB hash-partitioned both sides
        // of the join of a full load's 10M changes with the 56k changes they supersede: every one of
        // the 10M rows copied into a partition on each read.
        (
            "datafusion.optimizer.hash_join_single_partition_threshold".to_string(),
            (10usize << 20).to_string(),
        ),
    ]);
    let ctx: datafusion::prelude::SessionContext =
        deltalake::delta_datafusion::DeltaSessionContext::new_with_session_overrides(&overrides)
            .map_err(|e| session_failed(&e))?
            .into();
    let Some(runtime) = runtime else {
        return Ok(ctx);
    };
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
        .with_runtime_env(runtime)
        .build();
    Ok(datafusion::prelude::SessionContext::new_with_state(state))
}

fn session_failed(error: &dyn std::fmt::Display) -> DeltaError {
    DeltaError::Invalid {
        table: "-".into(),
        message: format!("cannot set up the query session: {error}"),
    }
}

/// Lineage written into every commit's info, so `DESCRIBE HISTORY` shows which run and stage made it.
#[derive(Debug, Clone, Default)]
pub struct CommitMeta {
    pub run_id: String,
    pub stage: String,
}

impl CommitMeta {
    fn properties(&self) -> deltalake::kernel::transaction::CommitProperties {
        self.properties_with(Vec::new())
    }

    /// The lineage plus `extra` entries in the commit info.
    fn properties_with(
        &self,
        extra: Vec<(String, serde_json::Value)>,
    ) -> deltalake::kernel::transaction::CommitProperties {
        let lineage = [
            (
                "medallion.run_id".to_string(),
                serde_json::Value::String(self.run_id.clone()),
            ),
            (
                "medallion.stage".to_string(),
                serde_json::Value::String(self.stage.clone()),
            ),
        ];
        history::no_log_cleanup(
            deltalake::kernel::transaction::CommitProperties::default()
                .with_metadata(lineage.into_iter().chain(extra)),
        )
    }
}

/// One commit read from a table's log.
#[derive(Debug, Clone)]
pub struct CommitSummary {
    pub version: u64,
    /// The commit info, with medallion's own keys (`medallion.run_id`, ...).
    pub info: serde_json::Map<String, serde_json::Value>,
    /// Whether it added or removed data files (compaction does not).
    pub changes_data: bool,
}

/// The commits after `after_version`, oldest first; `None` when one is no longer in the log.
pub async fn commits_since(
    table: &DeltaTable,
    after_version: u64,
) -> Result<Option<Vec<CommitSummary>>, DeltaError> {
    commits_from(table, after_version + 1).await
}

/// The commits from version `first` on, oldest first; `None` when one is no longer in the log.
pub async fn commits_from(
    table: &DeltaTable,
    first: u64,
) -> Result<Option<Vec<CommitSummary>>, DeltaError> {
    let Some(current) = table.version() else {
        return Ok(Some(Vec::new()));
    };
    let store = table.log_store();
    let mut commits = Vec::new();
    for version in first..=current {
        let Some(bytes) =
            store
                .read_commit_entry(version as _)
                .await
                .map_err(|e| DeltaError::Table {
                    table: table.table_url().to_string(),
                    source: e,
                })?
        else {
            return Ok(None);
        };
        let mut summary = CommitSummary {
            version,
            info: serde_json::Map::new(),
            changes_data: false,
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                return Ok(None);
            };
            if let Some(serde_json::Value::Object(info)) = action.get("commitInfo") {
                summary.info = info.clone();
            }
            for kind in ["add", "remove"] {
                if let Some(file) = action.get(kind)
                    && file.get("dataChange").and_then(|d| d.as_bool()) != Some(false)
                {
                    summary.changes_data = true;
                }
            }
        }
        commits.push(summary);
    }
    Ok(Some(commits))
}

/// `"name"` quoted for SQL expressions.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Asserts that `ctx` plans the anti join of `table` (a column `k`) with ten million generated keys, a
/// side of unknown size, by hashing `table` once (`CollectLeft`), not by partitioning both sides.
#[cfg(test)]
pub(crate) async fn assert_hashed_once(ctx: &datafusion::prelude::SessionContext, table: &str) {
    let batches = ctx
        .sql(&format!(
            "EXPLAIN SELECT COUNT(*) FROM {table} s RIGHT ANTI JOIN \
             (SELECT value AS k FROM generate_series(1, 10000000)) c ON s.k = c.k"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let plan = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(plan.contains("mode=CollectLeft"), "{plan}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_parse_from_what_a_pipeline_names_and_survive_the_table_property() {
        for (named, kept) in [
            ("zstd", "zstd(1)"),
            ("ZSTD(3)", "zstd(3)"),
            (" snappy ", "snappy"),
            ("lz4", "lz4_raw"),
            ("LZ4_RAW", "lz4_raw"),
            ("gzip", "gzip(6)"),
            ("gzip(9)", "gzip(9)"),
            ("none", "none"),
            ("uncompressed", "none"),
        ] {
            let codec: Codec = named.parse().unwrap_or_else(|e| panic!("{named}: {e}"));
            assert_eq!(codec.to_string(), kept, "{named}");
            assert_eq!(kept.parse::<Codec>(), Ok(codec), "{kept} read back");
        }
        assert_eq!("zstd".parse::<Codec>(), Ok(Codec::zstd()));
        for refused in [
            "brotli(1)",
            "lzo",
            "lz4(1)",
            "zstd(0)",
            "zstd(23)",
            "gzip(10)",
            "zstd(",
            "snappy()",
            "snappy(1)",
            "zstd(1é)",
            "zstd(-1)",
            "zstd(99999999999)",
            "gzip(6",
            "",
            "zip",
        ] {
            let error = refused.parse::<Codec>().expect_err(refused);
            assert!(
                error.contains("use zstd, zstd(<1-22>), snappy"),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn statistics_columns_with_any_name_survive_the_table_property() {
        let names: Vec<String> = ["dms_id", "my col", "a,b", "tick`s", "9lives"]
            .iter()
            .map(|n| n.to_string())
            .collect();
        let text = format_stats_columns(&names);
        assert_eq!(text, "dms_id,`my col`,`a,b`,`tick``s`,`9lives`");
        assert_eq!(parse_stats_columns(&text), names);
        // As another tool may write it: spaces around names, quoted or not.
        assert_eq!(
            parse_stats_columns(" a , `b c` ,d"),
            ["a", "b c", "d"].map(String::from)
        );
    }

    #[tokio::test]
    async fn a_join_side_under_10_mib_is_hashed_once_and_the_other_side_streamed() {
        let ctx = session(None).unwrap();
        let state = ctx.state();
        let threshold = state
            .config()
            .options()
            .optimizer
            .hash_join_single_partition_threshold;
        assert_eq!(threshold, 10 << 20);
        // 300,000 keys of 8 bytes (2.4 MB, over DataFusion's default of 1 MiB) against a side of
        // unknown size: the small side is collected, the large one not repartitioned.
        ctx.sql("CREATE TABLE small AS SELECT value AS k FROM generate_series(1, 300000)")
            .await
            .unwrap();
        assert_hashed_once(&ctx, "small").await;
    }
}
