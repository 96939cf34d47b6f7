//! The writer of a table's data files: medallion's own for a local table, delta-rs's otherwise.
//!
//! delta-rs's writer encodes each row group into a buffer that starts empty and doubles as it grows,
//! then hands the buffer to the object store: at 10M rows that growth was a third of the ingest's page
//! faults (BENCHMARKS.md, item 60). A local table's files are instead written straight to its
//! directory by Parquet's writer, as the CSV→Parquet floor writes its files, and given the `add`
//! action delta-rs gives its files: path, size, partition values, and the statistics of the Parquet
//! footer. Tables on object stores, tables partitioned other than by one column of integers or dates,
//! and tables with nested columns keep delta-rs's writer.

use std::{
    collections::HashMap,
    fs::File,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use std::sync::Arc;

use datafusion::arrow::{
    array::{AsArray, RecordBatch, UInt32Array},
    compute::{cast, take_record_batch},
    datatypes::{DataType, Int64Type, Schema, SchemaRef},
};
use deltalake::{
    DeltaTable,
    kernel::Add,
    parquet::{
        arrow::ArrowWriter,
        basic::{Compression, LogicalType, TimeUnit},
        file::{metadata::ParquetMetaData, properties::WriterProperties, statistics::Statistics},
        schema::types::ColumnPath,
    },
    writer::{DeltaWriter, RecordBatchWriter},
};
use serde_json::{Map, Value};

use super::DeltaError;
use crate::storage::Location;

/// At most this many files of one writer are open at once (one per partition value): past it, the
/// longest open is finished, so that a table of many partitions cannot run out of file handles.
const MAX_OPEN_FILES: usize = 64;

/// How many leading columns get statistics when a table names neither its stats columns nor a count
/// (the default of `delta.dataSkippingNumIndexedCols`).
const DEFAULT_INDEXED_COLUMNS: usize = 32;

/// Which columns a file's `add` gives statistics for, as the table's properties say.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum StatsScope {
    /// `delta.dataSkippingStatsColumns`: these, by name.
    Named(Vec<String>),
    /// `delta.dataSkippingNumIndexedCols`: the first this many (`None`: all).
    First(Option<usize>),
}

impl StatsScope {
    /// The scope of a table whose configuration is `configuration`. A negative count means every
    /// column, as the Delta protocol says (delta-rs 1.1 reads it as the default, 32).
    pub fn of(configuration: &HashMap<String, String>) -> StatsScope {
        if let Some(columns) = configuration.get("delta.dataSkippingStatsColumns") {
            // Names as medallion writes them: quoted in backticks where they need it.
            return StatsScope::Named(super::parse_stats_columns(columns));
        }
        match configuration
            .get("delta.dataSkippingNumIndexedCols")
            .and_then(|n| n.trim().parse::<i64>().ok())
        {
            Some(n) if n < 0 => StatsScope::First(None),
            Some(n) => StatsScope::First(Some(n as usize)),
            None => StatsScope::First(Some(DEFAULT_INDEXED_COLUMNS)),
        }
    }

    /// The scope of a table created with `stats_columns` named, or none.
    pub fn for_new(stats_columns: Option<&[String]>) -> StatsScope {
        match stats_columns {
            Some(columns) => StatsScope::Named(columns.to_vec()),
            None => StatsScope::First(Some(DEFAULT_INDEXED_COLUMNS)),
        }
    }

    fn includes(&self, index: usize, name: &str) -> bool {
        match self {
            StatsScope::Named(names) => names.iter().any(|n| n == name),
            StatsScope::First(count) => count.is_none_or(|count| index < count),
        }
    }
}

/// Writes batches of one schema into new data files of a table, cut at a target size;
/// [`FileWriter::flush`] finishes them and gives their `add` actions, for the caller to commit.
pub(super) struct FileWriter {
    table: Location,
    kind: Kind,
}

enum Kind {
    Delta(Box<RecordBatchWriter>),
    Local(Box<LocalFiles>),
}

impl FileWriter {
    /// A writer of files for the table at `table`, whose delta-rs writer is `writer` and partition
    /// columns `partition_by`: medallion's own when the table is local and flat, and partitioned by
    /// at most one column of integers or dates; `writer` itself otherwise.
    pub fn new(
        table: &Location,
        writer: RecordBatchWriter,
        partition_by: &[String],
        stats: StatsScope,
        properties: WriterProperties,
        target_size: u64,
    ) -> FileWriter {
        let schema = writer.arrow_schema();
        let flat = schema.fields().iter().all(|f| !f.data_type().is_nested());
        let partition = match partition_by {
            [] => Ok(None),
            [column] => Partition::new(&schema, column).map(Some).ok_or(()),
            _ => Err(()),
        };
        let kind = match (table.local_path(), partition) {
            (Some(dir), Ok(partition)) if flat => {
                let file_schema = match &partition {
                    Some(p) => {
                        let mut fields = schema.fields().to_vec();
                        fields.remove(p.index);
                        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
                    }
                    None => schema.clone(),
                };
                Kind::Local(Box::new(LocalFiles {
                    dir: dir.to_path_buf(),
                    schema,
                    file_schema,
                    partition,
                    stats,
                    properties,
                    target_size,
                    open: Vec::new(),
                    finished: Vec::new(),
                }))
            }
            _ => Kind::Delta(Box::new(
                writer
                    .with_target_file_size(target_size)
                    .with_writer_properties(properties),
            )),
        };
        FileWriter {
            table: table.clone(),
            kind,
        }
    }

    /// A writer of new files for `table` (at `path`), with `properties`, cut at about `target_size`.
    pub fn for_table(
        path: &Location,
        table: &DeltaTable,
        properties: WriterProperties,
        target_size: u64,
    ) -> Result<FileWriter, DeltaError> {
        let writer = RecordBatchWriter::for_table(table).map_err(|e| DeltaError::table(path, e))?;
        let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
        let metadata = snapshot.metadata();
        Ok(FileWriter::new(
            path,
            writer,
            metadata.partition_columns(),
            StatsScope::of(metadata.configuration()),
            properties,
            target_size,
        ))
    }

    /// The schema batches must have.
    pub fn arrow_schema(&self) -> SchemaRef {
        match &self.kind {
            Kind::Delta(writer) => writer.arrow_schema(),
            Kind::Local(files) => files.schema.clone(),
        }
    }

    /// Whether batches may hold string views where the table stores strings: Parquet's writer encodes
    /// both alike, delta-rs's takes strings only (a copy of every string column of every batch).
    pub fn takes_views(&self) -> bool {
        matches!(self.kind, Kind::Local(_))
    }

    /// Bytes written to files not finished yet.
    pub fn buffer_len(&self) -> usize {
        match &self.kind {
            Kind::Delta(writer) => writer.buffer_len(),
            Kind::Local(files) => files.open.iter().map(OpenFile::bytes).sum(),
        }
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), DeltaError> {
        match &mut self.kind {
            Kind::Delta(writer) => writer
                .write(batch)
                .await
                .map_err(|e| DeltaError::table(&self.table, e)),
            Kind::Local(files) => files.write(&batch).map_err(|m| self.invalid(m)),
        }
    }

    /// Finishes the files written so far and gives their `add` actions.
    pub async fn flush(&mut self) -> Result<Vec<Add>, DeltaError> {
        match &mut self.kind {
            Kind::Delta(writer) => writer
                .flush()
                .await
                .map_err(|e| DeltaError::table(&self.table, e)),
            Kind::Local(files) => files.flush().map_err(|m| self.invalid(m)),
        }
    }

    fn invalid(&self, message: String) -> DeltaError {
        DeltaError::Invalid {
            table: self.table.to_string(),
            message,
        }
    }
}

/// A table's one partition column, of integers or dates: values that name a folder as they are.
#[derive(Debug, Clone)]
struct Partition {
    column: String,
    /// Its place among the table's columns.
    index: usize,
    date: bool,
}

/// A row's partition value: an integer, or a date's days since 1970-01-01; `None` for NULL.
type PartitionKey = Option<i64>;

impl Partition {
    fn new(schema: &Schema, column: &str) -> Option<Partition> {
        let index = schema.index_of(column).ok()?;
        // A Delta table's integers are signed.
        let date = match schema.field(index).data_type() {
            DataType::Date32 => true,
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => false,
            _ => return None,
        };
        Some(Partition {
            column: column.to_string(),
            index,
            date,
        })
    }

    /// Each row's key.
    fn keys(&self, batch: &RecordBatch) -> Result<Vec<PartitionKey>, String> {
        let column = batch.column(self.index);
        let column = if self.date {
            cast(column, &DataType::Int32).and_then(|days| cast(&days, &DataType::Int64))
        } else {
            cast(column, &DataType::Int64)
        }
        .map_err(|e| format!("cannot read partition column `{}`: {e}", self.column))?;
        Ok(column.as_primitive::<Int64Type>().iter().collect())
    }

    /// The value as the `add` gives it (`None` for NULL, and for a date chrono cannot write), as
    /// delta-rs serializes it.
    fn value(&self, key: PartitionKey) -> Option<String> {
        let key = key?;
        match self.date {
            true => date(key),
            false => Some(key.to_string()),
        }
    }

    /// The folder of the key's files: `column=value`, Hive's default partition for NULL.
    fn folder(&self, key: PartitionKey) -> String {
        let value = self.value(key);
        let value = value.as_deref().unwrap_or("__HIVE_DEFAULT_PARTITION__");
        format!("{}={value}", self.column)
    }
}

/// Data files written straight into a local table's directory.
struct LocalFiles {
    dir: PathBuf,
    /// The table's schema, which batches come in.
    schema: SchemaRef,
    /// What its files hold: the schema without the partition column.
    file_schema: SchemaRef,
    partition: Option<Partition>,
    stats: StatsScope,
    properties: WriterProperties,
    target_size: u64,
    /// The files being written, one per partition value at most.
    open: Vec<OpenFile>,
    /// The `add` actions of the files finished since the last flush.
    finished: Vec<Add>,
}

struct OpenFile {
    key: PartitionKey,
    /// Its path from the table's directory.
    name: String,
    writer: ArrowWriter<File>,
}

impl OpenFile {
    fn bytes(&self) -> usize {
        self.writer.bytes_written() + self.writer.in_progress_size()
    }
}

impl LocalFiles {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let Some(partition) = &self.partition else {
            return self.write_to(None, batch.clone());
        };
        let keys = partition.keys(batch)?;
        let columns: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| i != partition.index)
            .collect();
        let project = |rows: RecordBatch| rows.project(&columns).map_err(|e| e.to_string());
        // Rows come clustered by time: a batch usually holds one partition.
        if keys.iter().all(|k| *k == keys[0]) {
            return self.write_to(keys[0], project(batch.clone())?);
        }
        let mut groups: HashMap<PartitionKey, Vec<u32>> = HashMap::new();
        for (row, key) in keys.iter().enumerate() {
            groups.entry(*key).or_default().push(row as u32);
        }
        for (key, rows) in groups {
            let rows =
                take_record_batch(batch, &UInt32Array::from(rows)).map_err(|e| e.to_string())?;
            self.write_to(key, project(rows)?)?;
        }
        Ok(())
    }

    /// Writes `rows` (without the partition column) into the open file of partition `key`.
    fn write_to(&mut self, key: PartitionKey, rows: RecordBatch) -> Result<(), String> {
        let at = match self.open.iter().position(|f| f.key == key) {
            Some(at) => at,
            None => {
                if self.open.len() >= MAX_OPEN_FILES {
                    let longest = self.open.remove(0);
                    self.finish(longest)?;
                }
                let file = self.create(key)?;
                self.open.push(file);
                self.open.len() - 1
            }
        };
        // The encoded row groups go to the page cache as they are finished, on the task that encodes:
        // a wait no longer than the encoding before it.
        let file = &mut self.open[at];
        file.writer
            .write(&rows)
            .map_err(|e| format!("cannot write data file `{}`: {e}", file.name))?;
        if file.bytes() as u64 >= self.target_size {
            let file = self.open.swap_remove(at);
            self.finish(file)?;
        }
        Ok(())
    }

    fn create(&self, key: PartitionKey) -> Result<OpenFile, String> {
        let mut name = file_name(&self.properties);
        let mut dir = self.dir.clone();
        if let Some(partition) = &self.partition {
            let folder = partition.folder(key);
            dir.push(&folder);
            // Values of integers and dates: the folder needs no escaping (nor does a column name,
            // which delta-rs takes as it is too).
            name = format!("{folder}/{name}");
        }
        // A table not created yet (a first load's files come before its first commit) has no folder.
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create folder `{}`: {e}", dir.display()))?;
        let path = self.dir.join(&name);
        let file = File::create(&path)
            .map_err(|e| format!("cannot create data file `{}`: {e}", path.display()))?;
        let properties = Some(self.properties.clone());
        let writer = ArrowWriter::try_new(file, self.file_schema.clone(), properties)
            .map_err(|e| format!("cannot write data file `{name}`: {e}"))?;
        Ok(OpenFile { key, name, writer })
    }

    /// Finishes `file` and keeps its `add`; a file that cannot be finished is deleted.
    fn finish(&mut self, file: OpenFile) -> Result<(), String> {
        let OpenFile {
            key,
            name,
            mut writer,
        } = file;
        let failed = |e: &dyn std::fmt::Display| {
            let _ = std::fs::remove_file(self.dir.join(&name));
            format!("cannot finish data file `{name}`: {e}")
        };
        let metadata = writer.finish().map_err(|e| failed(&e))?;
        let size = i64::try_from(writer.bytes_written()).map_err(|e| failed(&e))?;
        let stats = file_stats(&metadata, &self.stats);
        let partition_values = self
            .partition
            .iter()
            .map(|p| (p.column.clone(), p.value(key)))
            .collect();
        self.finished.push(Add {
            // A uuid, a codec and a partition folder: no escaping (see `create`).
            path: name,
            size,
            partition_values,
            modification_time: now_millis(),
            data_change: true,
            stats: Some(stats.to_string()),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        });
        Ok(())
    }

    fn flush(&mut self) -> Result<Vec<Add>, String> {
        let mut files = std::mem::take(&mut self.open).into_iter();
        while let Some(file) = files.next() {
            if let Err(error) = self.finish(file) {
                // The others stay open, for `drop` to delete.
                self.open.extend(files);
                return Err(error);
            }
        }
        Ok(std::mem::take(&mut self.finished))
    }
}

/// A file left unfinished (a write failed, or the writer was dropped for another's error) is
/// deleted: no `add` will name it. Finished files are the caller's to commit or discard.
impl Drop for LocalFiles {
    fn drop(&mut self) {
        for OpenFile { name, writer, .. } in std::mem::take(&mut self.open) {
            drop(writer);
            let path = self.dir.join(name);
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(
                    "could not remove the unfinished data file `{}`: {error}",
                    path.display()
                );
            }
        }
    }
}

/// A new data file's name, in delta-rs's pattern: `part-00000-<uuid>-c000.<codec>.parquet`.
fn file_name(properties: &WriterProperties) -> String {
    let codec = match properties.compression(&ColumnPath::new(Vec::new())) {
        Compression::UNCOMPRESSED => "",
        Compression::SNAPPY => ".snappy",
        Compression::GZIP(_) => ".gz",
        Compression::LZO => ".lzo",
        Compression::BROTLI(_) => ".br",
        Compression::LZ4 => ".lz4",
        Compression::ZSTD(_) => ".zstd",
        Compression::LZ4_RAW => ".lz4raw",
    };
    format!("part-00000-{}-c000{codec}.parquet", uuid::Uuid::new_v4())
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The `stats` of an `add` for the file whose footer is `metadata`: its rows, and each column in
/// `scope`'s least and greatest value and NULL count. A bound is left out when a row group has values
/// but no bound for them (floats that are all NaN), or when Delta cannot say it (binary columns,
/// infinite floats, decimals past 28 digits); readers then read the file whatever their filter.
fn file_stats(metadata: &ParquetMetaData, scope: &StatsScope) -> Value {
    let (mut mins, mut maxes, mut nulls) = (Map::new(), Map::new(), Map::new());
    let schema = metadata.file_metadata().schema_descr();
    for (index, column) in schema.columns().iter().enumerate() {
        let name = column.name();
        if column.path().parts().len() != 1 || !scope.includes(index, name) {
            continue;
        }
        let logical = column.logical_type_ref();
        let mut null_count = Some(0u64);
        let mut bounds: Option<Option<(Bound, Bound)>> = None;
        for group in metadata.row_groups() {
            let chunk = group.column(index);
            let Some(statistics) = chunk.statistics() else {
                null_count = None;
                bounds = Some(None);
                continue;
            };
            null_count = null_count
                .zip(statistics.null_count_opt())
                .map(|(a, b)| a + b);
            let rows = u64::try_from(group.num_rows()).unwrap_or(0);
            let group_bounds = Bound::of(statistics, logical);
            bounds = match (bounds, group_bounds) {
                // A row group of NULLs only has no bounds, and sets none.
                (bounds, None) if statistics.null_count_opt() == Some(rows) => bounds,
                (None, group) => Some(group),
                (Some(Some((low, high))), Some((l, h))) => Some(Some((low.min(l), high.max(h)))),
                _ => Some(None),
            };
        }
        if let Some((low, high)) = bounds.flatten()
            && let (Some(low), Some(high)) = (low.json(false), high.json(true))
        {
            mins.insert(name.to_string(), low);
            maxes.insert(name.to_string(), high);
        }
        if let Some(count) = null_count {
            nulls.insert(name.to_string(), Value::from(count));
        }
    }
    serde_json::json!({
        "numRecords": metadata.file_metadata().num_rows(),
        "minValues": mins,
        "maxValues": maxes,
        "nullCount": nulls,
    })
}

/// A column's least or greatest value in a row group, as Delta's statistics give it.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum Bound {
    Boolean(bool),
    Integer(i64),
    Float(f64),
    /// Days since 1970-01-01.
    Date(i32),
    /// Nanoseconds since 1970-01-01 00:00 UTC (`utc`), or of a local time (`!utc`).
    Timestamp {
        nanos: i128,
        utc: bool,
    },
    /// An unscaled value and its scale.
    Decimal {
        unscaled: i128,
        scale: i32,
    },
    String(String),
}

impl Bound {
    /// A row group's least and greatest value, from its `statistics` of a column of `logical` type.
    fn of(statistics: &Statistics, logical: Option<&LogicalType>) -> Option<(Bound, Bound)> {
        fn pair<T: Copy>(
            min: Option<&T>,
            max: Option<&T>,
            bound: impl Fn(T) -> Option<Bound>,
        ) -> Option<(Bound, Bound)> {
            Some((bound(*min?)?, bound(*max?)?))
        }
        let signed = |logical: Option<&LogicalType>| match logical {
            None => true,
            Some(LogicalType::Integer(int)) => int.is_signed,
            Some(_) => false,
        };
        match (statistics, logical) {
            (Statistics::Boolean(s), _) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Boolean(v)))
            }
            (Statistics::Int32(s), Some(LogicalType::Date)) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Date(v)))
            }
            (Statistics::Int32(s), Some(LogicalType::Decimal(d))) => {
                pair(s.min_opt(), s.max_opt(), |v| {
                    Some(Bound::decimal(v.into(), d.scale))
                })
            }
            (Statistics::Int32(s), logical) if signed(logical) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Integer(v.into())))
            }
            (Statistics::Int64(s), Some(LogicalType::Timestamp(t))) => {
                let utc = t.is_adjusted_to_u_t_c;
                let per_nano = match t.unit {
                    TimeUnit::MILLIS => 1_000_000,
                    TimeUnit::MICROS => 1_000,
                    TimeUnit::NANOS => 1,
                };
                pair(s.min_opt(), s.max_opt(), |v| {
                    Some(Bound::Timestamp {
                        nanos: i128::from(v) * per_nano,
                        utc,
                    })
                })
            }
            (Statistics::Int64(s), Some(LogicalType::Decimal(d))) => {
                pair(s.min_opt(), s.max_opt(), |v| {
                    Some(Bound::decimal(v.into(), d.scale))
                })
            }
            (Statistics::Int64(s), logical) if signed(logical) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Integer(v)))
            }
            (Statistics::Float(s), None) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Float(v.into())))
            }
            (Statistics::Double(s), None) => {
                pair(s.min_opt(), s.max_opt(), |v| Some(Bound::Float(v)))
            }
            (Statistics::ByteArray(s), Some(LogicalType::String)) => {
                // Past 64 bytes Parquet truncates a least value (a prefix, still a bound) and a
                // greatest one with its last character raised (still a bound): delta-rs takes both.
                let text = |b: Option<&[u8]>| String::from_utf8(b?.to_vec()).ok();
                Some((
                    Bound::String(text(s.min_bytes_opt())?),
                    Bound::String(text(s.max_bytes_opt())?),
                ))
            }
            (Statistics::FixedLenByteArray(s), Some(LogicalType::Decimal(d))) => Some((
                Bound::decimal(big_endian(s.min_bytes_opt()?)?, d.scale),
                Bound::decimal(big_endian(s.max_bytes_opt()?)?, d.scale),
            )),
            _ => None,
        }
    }

    fn decimal(unscaled: i128, scale: i32) -> Bound {
        Bound::Decimal { unscaled, scale }
    }

    fn min(self, other: Bound) -> Bound {
        if other < self { other } else { self }
    }

    fn max(self, other: Bound) -> Bound {
        if other > self { other } else { self }
    }

    /// The bound as Delta's statistics write it, as delta-rs writes it; `greatest` for a maximum,
    /// which is widened, never narrowed, where the format holds less than the value (timestamps hold
    /// milliseconds, decimals are written as doubles). `None` when it cannot be written.
    fn json(&self, greatest: bool) -> Option<Value> {
        Some(match self {
            Bound::Boolean(v) => Value::from(*v),
            Bound::Integer(v) => Value::from(*v),
            // JSON has no infinity (serde_json would write `null`).
            Bound::Float(v) => v.is_finite().then(|| Value::from(*v))?,
            Bound::Date(days) => Value::from(date((*days).into())?),
            Bound::Timestamp { nanos, utc } => {
                let widen = greatest && nanos.rem_euclid(1_000_000) != 0;
                let millis = i64::try_from(nanos.div_euclid(1_000_000) + i128::from(widen)).ok()?;
                let time = chrono::DateTime::from_timestamp_millis(millis)?.naive_utc();
                let format = match (*utc, millis.rem_euclid(1000) == 0) {
                    (true, true) => "%Y-%m-%dT%H:%M:%SZ",
                    (true, false) => "%Y-%m-%dT%H:%M:%S%.3fZ",
                    (false, true) => "%Y-%m-%d %H:%M:%S",
                    (false, false) => "%Y-%m-%d %H:%M:%S%.3f",
                };
                Value::from(time.format(format).to_string())
            }
            Bound::Decimal { unscaled, scale } => decimal_json(*unscaled, *scale, greatest)?,
            Bound::String(v) => Value::from(v.as_str()),
        })
    }
}

/// The date `days` after 1970-01-01, as `YYYY-MM-DD`; `None` past what chrono holds (±262,000 years).
fn date(days: i64) -> Option<String> {
    let date = chrono::DateTime::UNIX_EPOCH
        .date_naive()
        .checked_add_signed(chrono::TimeDelta::try_days(days)?)?;
    Some(date.format("%Y-%m-%d").to_string())
}

/// A two's-complement big-endian integer of 1 to 16 bytes (a decimal's unscaled value).
fn big_endian(bytes: &[u8]) -> Option<i128> {
    let first = *bytes.first()?;
    if bytes.len() > 16 {
        return None;
    }
    let mut value = [if first & 0x80 != 0 { 0xff } else { 0 }; 16];
    value[16 - bytes.len()..].copy_from_slice(bytes);
    Some(i128::from_be_bytes(value))
}

/// A decimal as delta-rs writes it: an integer when its scale is 0, a double otherwise. A double holds
/// 15 significant digits; past them the written value is moved, a least down and a greatest up, until
/// the number a reader parses from it is still a bound. `None` beyond what a decimal of 28 digits holds.
fn decimal_json(unscaled: i128, scale: i32, greatest: bool) -> Option<Value> {
    use rust_decimal::{Decimal, prelude::ToPrimitive};
    if scale == 0 {
        return i64::try_from(unscaled).ok().map(Value::from);
    }
    let exact = Decimal::try_from_i128_with_scale(unscaled, u32::try_from(scale).ok()?).ok()?;
    let mut value = exact.to_f64()?;
    for _ in 0..8 {
        let written = Value::from(value);
        let text = written.to_string();
        let read = Decimal::from_str_exact(&text)
            .or_else(|_| Decimal::from_scientific(&text))
            .ok()?;
        value = match read.cmp(&exact) {
            std::cmp::Ordering::Less if greatest => value.next_up(),
            std::cmp::Ordering::Greater if !greatest => value.next_down(),
            _ => return Some(written),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{
            ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
            Int64Array, StringArray, TimestampMicrosecondArray,
        },
        datatypes::{DataType, Field, Schema, TimeUnit as ArrowTimeUnit},
    };
    use deltalake::kernel::{Action, transaction::CommitProperties};
    use serde_json::json;

    use super::*;
    use crate::delta::{TableOptions, append::conform, create_if_missing, table_writer_properties};

    /// Every type of column a medallion table holds, NULLs in each nullable one.
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("small", DataType::Int32, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(18, 2), true),
            Field::new("day", DataType::Date32, true),
            Field::new(
                "at",
                DataType::Timestamp(ArrowTimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("flag", DataType::Boolean, true),
            Field::new("ratio", DataType::Float64, true),
            Field::new("empty", DataType::Utf8, true),
        ]))
    }

    /// `rows` rows from `first` on; the times are whole milliseconds unless `sub_millis`.
    fn batch(first: i64, rows: i64, sub_millis: bool) -> RecordBatch {
        let ids: Vec<i64> = (first..first + rows).collect();
        let nth = |i: i64, every: i64| i % every != 3;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int32Array::from_iter(
                ids.iter().map(|&i| nth(i, 7).then_some(i as i32 - 500)),
            )),
            // Some names past the 64 bytes at which Parquet truncates a bound.
            Arc::new(StringArray::from_iter(ids.iter().map(|&i| {
                let long = if i % 11 == 0 {
                    "~".repeat(70)
                } else {
                    String::new()
                };
                nth(i, 5).then(|| format!("name {:04}{long}", i * 37 % 1000))
            }))),
            Arc::new(
                Decimal128Array::from_iter(
                    ids.iter()
                        .map(|&i| nth(i, 4).then_some(i128::from(i) * 1234 - 99_999)),
                )
                .with_precision_and_scale(18, 2)
                .unwrap(),
            ),
            Arc::new(Date32Array::from_iter(
                ids.iter().map(|&i| nth(i, 6).then_some(19_000 + i as i32)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter(ids.iter().map(|&i| {
                    let micros = 1_700_000_000_000_000 + i * 1_000_000 + i * 7_000;
                    nth(i, 8).then_some(micros + if sub_millis { 1 } else { 0 })
                }))
                .with_timezone("UTC"),
            ),
            Arc::new(BooleanArray::from_iter(
                ids.iter().map(|&i| nth(i, 9).then_some(i % 2 == 0)),
            )),
            Arc::new(Float64Array::from_iter(
                ids.iter()
                    .map(|&i| nth(i, 10).then_some(i as f64 / 8.0 - 3.0)),
            )),
            Arc::new(StringArray::from(vec![None::<&str>; rows as usize])),
        ];
        RecordBatch::try_new(schema(), columns).unwrap()
    }

    /// `batch` with its string columns as string views.
    fn as_views(batch: &RecordBatch) -> RecordBatch {
        let (mut fields, mut columns) = (Vec::new(), Vec::new());
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let (field, column) = match field.data_type() {
                DataType::Utf8 => (
                    field.as_ref().clone().with_data_type(DataType::Utf8View),
                    datafusion::arrow::compute::cast(column, &DataType::Utf8View).unwrap(),
                ),
                _ => (field.as_ref().clone(), column.clone()),
            };
            fields.push(field);
            columns.push(column);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    async fn new_table(dir: &std::path::Path) -> (Location, DeltaTable) {
        let path = Location::from(dir);
        let table = create_if_missing(&path, &schema(), &TableOptions::default())
            .await
            .unwrap();
        (path, table)
    }

    fn stats(add: &Add) -> Value {
        serde_json::from_str(add.stats.as_deref().unwrap()).unwrap()
    }

    async fn write(writer: &mut FileWriter, batches: &[RecordBatch]) -> Vec<Add> {
        for batch in batches {
            writer.write(batch.clone()).await.unwrap();
        }
        writer.flush().await.unwrap()
    }

    /// Commits `adds` to `table` as an append.
    async fn commit(path: &Location, table: &DeltaTable, adds: Vec<Add>) {
        let operation = super::super::files::append_operation(path, table).unwrap();
        let actions = adds.into_iter().map(Action::Add).collect();
        super::super::files::commit(path, table, actions, operation, CommitProperties::default())
            .await
            .unwrap();
    }

    /// `sql`'s result over the table at `path` (as `t`), as text.
    async fn query(path: &Location, sql: &str) -> String {
        let table = crate::delta::open(path).await.unwrap().unwrap();
        let ctx = crate::delta::session(None).unwrap();
        let provider = crate::delta::provider(path, &table).await.unwrap();
        ctx.register_table("t", provider).unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_local_file_has_the_add_that_delta_rs_gives_it() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let batches = [batch(0, 700, false), batch(700, 600, false)];

        let (path, table) = new_table(ours.path()).await;
        // Row groups of 300 rows: bounds are merged over five of them, a column NULL in some.
        let properties = table_writer_properties(&table)
            .into_builder()
            .set_max_row_group_row_count(Some(300))
            .build();
        let mut writer =
            FileWriter::for_table(&path, &table, properties.clone(), u64::MAX).unwrap();
        assert!(writer.takes_views());
        // Strings come as DataFusion computes them, views, and are written as they come.
        let viewed: Vec<RecordBatch> = batches
            .iter()
            .map(|b| {
                let batch = as_views(b);
                let batch = conform(&path, batch, &writer.arrow_schema(), true).unwrap();
                assert_eq!(batch.schema().field(2).data_type(), &DataType::Utf8View);
                batch
            })
            .collect();
        let local = write(&mut writer, &viewed).await;

        let (their_path, their_table) = new_table(theirs.path()).await;
        let mut delta = FileWriter {
            table: their_path.clone(),
            kind: Kind::Delta(Box::new(
                RecordBatchWriter::for_table(&their_table)
                    .unwrap()
                    .with_writer_properties(properties),
            )),
        };
        let remote = write(&mut delta, &batches).await;

        assert_eq!((local.len(), remote.len()), (1, 1));
        let (ours_add, theirs_add) = (&local[0], &remote[0]);
        assert_eq!(stats(ours_add), stats(theirs_add));
        assert_eq!(stats(ours_add)["numRecords"], json!(1300));
        assert_eq!(stats(ours_add)["nullCount"]["empty"], json!(1300));
        assert_eq!(stats(ours_add)["minValues"]["amount"], json!(-999.99));
        assert_eq!(stats(ours_add)["maxValues"]["day"], json!("2025-07-29"));
        // The first row group's least name is truncated: still a bound, taken as delta-rs takes it.
        assert_eq!(stats(ours_add)["minValues"]["name"], json!("name 0000"));
        assert!(ours_add.data_change && ours_add.partition_values.is_empty());
        let on_disk = std::fs::metadata(ours.path().join(&ours_add.path))
            .unwrap()
            .len();
        assert_eq!(ours_add.size, on_disk as i64);
        assert!(
            ours_add.path.starts_with("part-00000-") && ours_add.path.ends_with(".zstd.parquet")
        );

        // Committed, the file reads back as written, and a filter on its bounds keeps it.
        commit(&path, &table, local).await;
        let count = |sql| query(&path, sql);
        let all = count("SELECT count(*) AS n, sum(id) AS s, sum(amount) AS a FROM t").await;
        assert!(all.contains("| 1300 | 844350 | 6833453.25 |"), "{all}");
        let last = count("SELECT count(*) AS n FROM t WHERE id >= 1299 AND name IS NOT NULL").await;
        assert!(last.contains("| 1 "), "{last}");
    }

    #[tokio::test]
    async fn a_bound_is_widened_where_delta_holds_less_than_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let (path, table) = new_table(dir.path()).await;
        let properties = table_writer_properties(&table);
        let mut writer = FileWriter::for_table(&path, &table, properties, u64::MAX).unwrap();
        let adds = write(&mut writer, &[batch(0, 100, true)]).await;
        let stats = stats(&adds[0]);
        // The first time is 1,700,000,000 s plus 1 µs; the last (row 98; row 99 is NULL) 1,700,000,098.686001 s.
        assert_eq!(stats["minValues"]["at"], json!("2023-11-14T22:13:20Z"));
        assert_eq!(stats["maxValues"]["at"], json!("2023-11-14T22:14:58.687Z"));

        // A decimal past a double's 15 digits: the least is written below it, the greatest above.
        let huge = 1_234_567_890_123_456_789i128;
        let read = |v: Value| {
            rust_decimal::Decimal::from_scientific(&v.to_string())
                .or_else(|_| rust_decimal::Decimal::from_str_exact(&v.to_string()))
                .unwrap()
        };
        let exact = rust_decimal::Decimal::from_i128_with_scale(huge, 2);
        assert!(read(decimal_json(huge, 2, false).unwrap()) <= exact);
        assert!(read(decimal_json(huge, 2, true).unwrap()) >= exact);
        assert_eq!(decimal_json(12_345, 2, true), Some(json!(123.45)));
        assert_eq!(decimal_json(-12_345, 0, false), Some(json!(-12345)));
    }

    #[tokio::test]
    async fn files_are_cut_at_the_target_size_and_named_columns_alone_get_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let options = TableOptions {
            stats_columns: Some(vec!["id".into(), "name".into()]),
            ..TableOptions::default()
        };
        let table = create_if_missing(&path, &schema(), &options).await.unwrap();
        let properties = table_writer_properties(&table);
        let mut writer = FileWriter::for_table(&path, &table, properties, 1).unwrap();
        let adds = write(&mut writer, &[batch(0, 50, false), batch(50, 50, false)]).await;
        assert_eq!(adds.len(), 2, "a file per batch past a target of one byte");
        let stats: Vec<Value> = adds.iter().map(stats).collect();
        // Row 0's name is 79 bytes: its bound is Parquet's first 64.
        let truncated = format!("name 0000{}", "~".repeat(55));
        assert_eq!(stats[0]["minValues"], json!({"id": 0, "name": truncated}));
        assert_eq!(stats[1]["minValues"]["id"], json!(50));
        assert_eq!(stats[1]["maxValues"]["id"], json!(99));
        assert_eq!(
            stats[1]["nullCount"].as_object().unwrap().len(),
            2,
            "{}",
            stats[1]
        );
        assert_ne!(adds[0].path, adds[1].path);
        assert_eq!(writer.buffer_len(), 0, "nothing left open after a flush");

        // A writer dropped before it finishes its file leaves no file behind.
        let properties = table_writer_properties(&table);
        let mut writer = FileWriter::for_table(&path, &table, properties, u64::MAX).unwrap();
        writer.write(batch(100, 50, false)).await.unwrap();
        assert!(writer.buffer_len() > 0);
        drop(writer);
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".parquet"))
            .collect();
        files.sort();
        let mut written: Vec<String> = adds.iter().map(|a| a.path.clone()).collect();
        written.sort();
        assert_eq!(files, written);
    }

    #[tokio::test]
    async fn a_table_partitioned_by_other_than_one_integer_or_date_keeps_delta_rs_s_writer() {
        for partition_by in [vec!["name"], vec!["small", "day"]] {
            let dir = tempfile::tempdir().unwrap();
            let path = Location::from(dir.path());
            let options = TableOptions {
                partition_by: partition_by.iter().map(|c| c.to_string()).collect(),
                ..TableOptions::default()
            };
            let table = create_if_missing(&path, &schema(), &options).await.unwrap();
            let properties = table_writer_properties(&table);
            let writer = FileWriter::for_table(&path, &table, properties, u64::MAX).unwrap();
            assert!(!writer.takes_views(), "{partition_by:?}");
        }
    }

    #[tokio::test]
    async fn a_table_partitioned_by_a_year_has_the_files_and_adds_delta_rs_gives_it() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("year", DataType::Int32, true),
            Field::new("v", DataType::Utf8, true),
        ]));
        // Years in runs, as rows come clustered by time, with a NULL year and a batch of one year.
        let batch = |keys: std::ops::Range<i64>| {
            let year = |k: i64| (k % 40 != 7).then_some(2010 + (k / 100) as i32);
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(keys.clone())),
                    Arc::new(Int32Array::from_iter(keys.clone().map(year))),
                    Arc::new(StringArray::from_iter_values(keys.map(|k| format!("v{k}")))),
                ],
            )
            .unwrap()
        };
        let batches = [batch(0..250), batch(250..300), batch(300..330)];
        let options = TableOptions {
            partition_by: vec!["year".into()],
            ..TableOptions::default()
        };
        let mut written = Vec::new();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (n, dir) in dirs.iter().enumerate() {
            let path = Location::from(dir.path());
            let table = create_if_missing(&path, &schema, &options).await.unwrap();
            let properties = table_writer_properties(&table);
            let mut writer =
                FileWriter::for_table(&path, &table, properties.clone(), u64::MAX).unwrap();
            if n == 1 {
                assert!(writer.takes_views(), "medallion's own writer");
            } else {
                writer.kind = Kind::Delta(Box::new(
                    RecordBatchWriter::for_table(&table)
                        .unwrap()
                        .with_writer_properties(properties),
                ));
            }
            let mut adds = write(&mut writer, &batches).await;
            adds.sort_by_key(|a| format!("{:?}", a.partition_values.get("year")));
            written.push((path, table, adds));
        }
        let (theirs, ours) = (&written[0].2, &written[1].2);
        assert_eq!(ours.len(), 5, "2010, 2011, 2012, 2013 and NULL");
        assert_eq!(ours.len(), theirs.len());
        for (our, their) in ours.iter().zip(theirs) {
            assert_eq!(our.partition_values, their.partition_values);
            assert_eq!(stats(our), stats(their));
            let folder = |p: &str| p.split('/').next().unwrap().to_string();
            assert_eq!(folder(&our.path), folder(&their.path));
            let on_disk = std::fs::metadata(dirs[1].path().join(&our.path))
                .unwrap()
                .len();
            assert_eq!(our.size, on_disk as i64);
        }
        assert_eq!(ours[0].partition_values.get("year"), Some(&None));
        assert!(ours[0].path.starts_with("year=__HIVE_DEFAULT_PARTITION__/"));
        assert_eq!(
            ours[1].partition_values.get("year"),
            Some(&Some("2010".to_string()))
        );

        // Committed, each year's rows read back in their partition.
        let (path, table, adds) = &written[1];
        commit(path, table, adds.clone()).await;
        let text = query(
            path,
            "SELECT year, count(*) AS n, sum(k) AS s, min(v) AS v FROM t GROUP BY year ORDER BY year",
        )
        .await;
        for row in [
            "| 2010 | 97 |",
            "| 2011 | 98 |",
            "| 2012 | 97 |",
            "| 2013 | 29 |",
            "|      | 9  |",
        ] {
            assert!(text.contains(row), "{row} in\n{text}");
        }
    }

    #[test]
    fn partition_values_and_folders_are_delta_rs_s() {
        let schema = Schema::new(vec![
            Field::new("year", DataType::Int32, true),
            Field::new("day", DataType::Date32, true),
            Field::new("name", DataType::Utf8, true),
        ]);
        let year = Partition::new(&schema, "year").unwrap();
        assert_eq!(year.value(Some(-12)), Some("-12".to_string()));
        assert_eq!(year.folder(Some(2010)), "year=2010");
        assert_eq!(year.folder(None), "year=__HIVE_DEFAULT_PARTITION__");
        let day = Partition::new(&schema, "day").unwrap();
        assert_eq!(day.value(Some(19_000)), Some("2022-01-08".to_string()));
        assert_eq!(day.folder(Some(-1)), "day=1969-12-31");
        assert_eq!(
            day.value(Some(i64::from(i32::MAX))),
            None,
            "past chrono's range"
        );
        let keys = day.keys(&batch_of(&schema, vec![None, Some(3)])).unwrap();
        assert_eq!(keys, vec![None, Some(3)]);
        assert!(
            Partition::new(&schema, "name").is_none(),
            "strings keep delta-rs's writer"
        );
    }

    /// A batch of `schema` whose date column holds `days`, the others NULL.
    fn batch_of(schema: &Schema, days: Vec<Option<i32>>) -> RecordBatch {
        let rows = days.len();
        RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                Arc::new(Int32Array::from(vec![None; rows])),
                Arc::new(Date32Array::from(days)),
                Arc::new(StringArray::from(vec![None::<&str>; rows])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_scope_follows_the_table_properties() {
        let config = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(StatsScope::of(&config(&[])), StatsScope::First(Some(32)));
        assert_eq!(
            StatsScope::of(&config(&[("delta.dataSkippingNumIndexedCols", "-1")])),
            StatsScope::First(None)
        );
        assert_eq!(
            StatsScope::of(&config(&[(
                "delta.dataSkippingStatsColumns",
                "a,`order id`"
            )])),
            StatsScope::Named(vec!["a".into(), "order id".into()]),
            "names as medallion writes them"
        );
        assert_eq!(
            StatsScope::of(&config(&[
                ("delta.dataSkippingNumIndexedCols", "2"),
                ("delta.dataSkippingStatsColumns", "b, c")
            ])),
            StatsScope::Named(vec!["b".into(), "c".into()])
        );
        let first_two = StatsScope::First(Some(2));
        assert!(first_two.includes(1, "x") && !first_two.includes(2, "x"));
    }
}
