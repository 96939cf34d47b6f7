//! Data files written and committed by hand, for the writes delta-rs's operations make slower than they
//! need to be: a query's result is written by one Parquet writer per partition of its plan (encoding
//! and compression run on every core), and the files added and removed go into one Delta commit.
//!
//! A write can also be *clustered* by ranges of an integer key ([`KeyRanges`]): each file then holds
//! one range, so that a later change to a few keys reads and rewrites the files of their ranges only,
//! and a reader's filter on the key (or on a column that grows with it, such as a date) skips the rest.

use std::{collections::HashSet, sync::Arc};

use datafusion::{
    arrow::{
        array::{Array, AsArray, RecordBatch, UInt32Array},
        compute::{cast, take_record_batch},
        datatypes::{DataType, Int64Type},
        error::ArrowError,
    },
    execution::SendableRecordBatchStream,
    prelude::DataFrame,
};
use deltalake::{
    DeltaTable, DeltaTableError,
    kernel::{
        Action, Add,
        transaction::{CommitBuilder, CommitProperties},
    },
    protocol::DeltaOperation,
    writer::RecordBatchWriter,
};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::task::JoinSet;

use super::{
    DeltaError,
    append::conform,
    file_writer::{FileWriter, StatsScope},
};
use crate::storage::Location;

/// Parquet files are cut at about this size while streaming, unless the table's options say otherwise.
pub(super) const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;

/// Bytes a row is assumed to take in a Parquet file when the table holds none to measure yet (a first
/// load). Above what the reference Silver table takes (about 16), so first-load files err small.
pub(super) const ASSUMED_ROW_BYTES: u64 = 32;

/// At most this many ranges (and so open writers) in one clustered write.
const MAX_RANGES: u64 = 256;

/// Equal ranges of an integer key's values, one file (or a few, past the target size) per range.
/// Keys below the first range go to it, above the last to the last, NULL to the first.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct KeyRanges {
    column: String,
    low: i64,
    high: i64,
    count: u64,
    /// Bytes the write is expected to take.
    bytes: u64,
}

impl KeyRanges {
    /// Ranges for writing `rows` rows with keys in `low..=high` in files of about `target_size` bytes,
    /// each row taking about `row_bytes` (`None`: not known): as many as files of that size. One range
    /// when one file holds them all, which is then written by one writer.
    pub fn for_write(
        column: &str,
        (low, high): (i64, i64),
        rows: u64,
        row_bytes: Option<u64>,
        target_size: u64,
    ) -> KeyRanges {
        let (low, high) = (low.min(high), high.max(low));
        let bytes = rows.saturating_mul(row_bytes.unwrap_or(ASSUMED_ROW_BYTES).max(1));
        let span = i128::from(high) - i128::from(low) + 1;
        let count = bytes
            .div_ceil(target_size.max(1))
            .clamp(1, MAX_RANGES)
            .min(u64::try_from(span).unwrap_or(u64::MAX))
            .min(rows.max(1));
        KeyRanges {
            column: column.to_string(),
            low,
            high,
            count,
            bytes,
        }
    }

    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Bytes one range is expected to take.
    fn range_bytes(&self) -> u64 {
        self.bytes / self.count.max(1)
    }

    /// The range holding `key`.
    fn index(&self, key: i64) -> usize {
        let span = i128::from(self.high) - i128::from(self.low) + 1;
        let offset = (i128::from(key) - i128::from(self.low)).clamp(0, span - 1);
        (offset * i128::from(self.count) / span) as usize
    }

    /// `batch`'s rows split by range: (range, rows), in range order, ranges without rows left out.
    fn split(&self, batch: &RecordBatch) -> Result<Vec<(usize, RecordBatch)>, ArrowError> {
        let column = batch.column_by_name(&self.column).ok_or_else(|| {
            ArrowError::SchemaError(format!("no column `{}` to cluster by", self.column))
        })?;
        let keys = cast(column, &DataType::Int64)?;
        let keys = keys.as_primitive::<Int64Type>();
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.count()];
        for row in 0..keys.len() {
            let range = if keys.is_null(row) {
                0
            } else {
                self.index(keys.value(row))
            };
            rows[range].push(row as u32);
        }
        let mut parts = Vec::new();
        for (range, indices) in rows.into_iter().enumerate() {
            if indices.len() == batch.num_rows() {
                return Ok(vec![(range, batch.clone())]);
            }
            if !indices.is_empty() {
                parts.push((
                    range,
                    take_record_batch(batch, &UInt32Array::from(indices))?,
                ));
            }
        }
        Ok(parts)
    }
}

/// How a write lays its rows out in files.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Files are cut at about this size.
    pub target_size: u64,
    /// With ranges, each file holds rows of one key range; without, rows go to files as they come.
    pub ranges: Option<KeyRanges>,
    /// The table's partition columns: an unclustered writer finishes its files when its rows move on
    /// to other partitions (see [`PartitionsSeen`]).
    pub partition_by: Vec<String>,
    /// The ranges of a column the rows come in, one after another: an unclustered writer finishes its
    /// files when its rows move on to the next, once it has written [`Cuts::min_bytes`].
    pub cuts: Option<Cuts>,
}

impl Layout {
    /// Files cut at `target_size` (the default size for `None`), rows as they come.
    pub fn unclustered(target_size: Option<u64>) -> Layout {
        Layout {
            target_size: target_size.unwrap_or(TARGET_FILE_SIZE),
            ranges: None,
            partition_by: Vec::new(),
            cuts: None,
        }
    }
}

/// Bytes a writer writes before it may finish its files early: when a partitioned table's rows move
/// on to other partitions, or at a cut between slices ([`Cuts`]): by the writer's estimate, so a
/// file ends a little under or over it. `maintain` compacts a table rebuilt by ranges into files of
/// at most half of it, leaving those apart.
pub const MIN_EARLY_FINISH_BYTES: usize = 8 * 1024 * 1024;

/// The ranges of a column's values that a result gives its rows in, range after range in each of
/// its partitions (a result computed in slices, [`super::slices`]): below the first bound, from
/// each bound to the next, and from the last up with NULL. A writer finishes its files when its
/// rows move on to the next range and it has written `min_bytes` since its last file began, so
/// that a file holds the values of one range, or of a few consecutive ones when they are small (and
/// the end of one range with the next when a file of the target size ended within it). An overwrite
/// of some values (the dates a batch touched) then rewrites the files of their ranges, not every
/// file: a Gold aggregate written in one file per writer held every date in each. Only dates
/// (`Date32`) and integers are told apart; with another type, nothing is cut.
#[derive(Debug, Clone)]
pub(super) struct Cuts {
    /// The column, a date or an integer in the rows written.
    pub column: String,
    /// Increasing, as the column's values cast to 64-bit integers (days since 1970 for a date).
    pub bounds: Vec<i64>,
    /// Bytes a writer writes before it may finish its files at a cut: smaller ranges share files.
    pub min_bytes: usize,
}

impl Cuts {
    pub fn new(column: String, bounds: Vec<i64>) -> Cuts {
        Cuts {
            column,
            bounds,
            min_bytes: MIN_EARLY_FINISH_BYTES,
        }
    }

    /// The range of `batch`'s rows, told by its first value (a batch comes from one range); the
    /// last for NULL. `None` when the batch has no such column of a date or an integer.
    pub(super) fn range_of(&self, batch: &RecordBatch) -> Option<usize> {
        let column = batch.column_by_name(&self.column)?;
        if !(column.data_type().is_integer() || column.data_type() == &DataType::Date32) {
            return None;
        }
        let Some(row) = (0..column.len()).find(|&row| column.is_valid(row)) else {
            return Some(self.bounds.len());
        };
        let value = cast(&column.slice(row, 1), &DataType::Int64).ok()?;
        let value = value.as_primitive::<Int64Type>().value(0);
        Some(self.bounds.partition_point(|&b| b <= value))
    }
}

/// The partitions a writer has written to since its files were last finished. A writer keeps a file
/// open for each (a Parquet writer's state, and on an object store an upload buffer, several MiB
/// each): the fact's ten year partitions held 215 MiB at 10M rows. When a batch holds none of them,
/// the rows have moved on (they come clustered by time), and the open files can be finished.
struct PartitionsSeen {
    columns: Vec<usize>,
    converter: datafusion::arrow::row::RowConverter,
    seen: HashSet<datafusion::arrow::row::OwnedRow>,
}

impl PartitionsSeen {
    /// `None` for a table without partitions (or columns not in `schema`).
    fn new(
        partition_by: &[String],
        schema: &datafusion::arrow::datatypes::Schema,
    ) -> Option<PartitionsSeen> {
        use datafusion::arrow::row::{RowConverter, SortField};
        if partition_by.is_empty() {
            return None;
        }
        let columns: Vec<usize> = partition_by
            .iter()
            .map(|c| schema.index_of(c).ok())
            .collect::<Option<_>>()?;
        let fields = columns
            .iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect();
        Some(PartitionsSeen {
            columns,
            converter: RowConverter::new(fields).ok()?,
            seen: HashSet::new(),
        })
    }

    /// Records `batch`'s partitions; true when it holds none of those seen before (and some were).
    fn moved_on(&mut self, batch: &RecordBatch) -> bool {
        let arrays: Vec<_> = self
            .columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        let Ok(rows) = self.converter.convert_columns(&arrays) else {
            return false;
        };
        // Rows of one partition come together: each run of them is hashed (and copied) once.
        let mut batch_partitions = HashSet::new();
        let mut previous = None;
        for row in rows.iter() {
            if previous != Some(row) {
                batch_partitions.insert(row.owned());
                previous = Some(row);
            }
        }
        let moved = !self.seen.is_empty() && self.seen.is_disjoint(&batch_partitions);
        if moved {
            self.seen = batch_partitions;
        } else {
            self.seen.extend(batch_partitions);
        }
        moved
    }
}

/// Files written for a table and not yet committed to it.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub adds: Vec<Add>,
    pub rows: u64,
}

/// Writes `frame`'s result as new data files of `table` (partitioned as the table is), each partition
/// of the plan by its own writer on its own task. Nothing is committed: until the files are, readers do
/// not see them, and `medallion maintain` vacuums them if the commit never comes.
pub(super) async fn write_files(
    path: &Location,
    table: &DeltaTable,
    frame: DataFrame,
    layout: &Layout,
) -> Result<Written, DeltaError> {
    let streams = frame
        .execute_stream_partitioned()
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    let layout = Layout {
        partition_by: partition_columns(table),
        ..layout.clone()
    };
    let properties = super::table_writer_properties(table);
    let new_writer = || FileWriter::for_table(path, table, properties.clone(), layout.target_size);
    write_streams(path, new_writer, streams, &layout).await
}

/// As [`write_streams`], as new files of `table`, or, when it does not exist yet, of the table that
/// `schema` and `options` create ([`super::create_if_missing`]), laid out as `layout` says.
pub(super) async fn write_new_files(
    path: &Location,
    table: Option<&DeltaTable>,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    options: &super::TableOptions,
    streams: Vec<SendableRecordBatchStream>,
    layout: &Layout,
) -> Result<Written, DeltaError> {
    if let Some(table) = table {
        let properties = super::table_writer_properties(table);
        let new_writer =
            || FileWriter::for_table(path, table, properties.clone(), layout.target_size);
        return write_streams(path, new_writer, streams, layout).await;
    }
    let url = path.url().map_err(|source| DeltaError::Storage {
        table: path.to_string(),
        source,
    })?;
    let schema = Arc::new(super::stored_schema(schema, options));
    let partition_by = &options.partition_by;
    let partitions = (!partition_by.is_empty()).then(|| partition_by.clone());
    let storage = path.delta_options();
    let properties = super::statistics_properties(
        options.stats_columns.as_deref(),
        &super::integer_columns(&schema),
        options.compression.unwrap_or_else(super::Codec::zstd),
    );
    let new_writer = || {
        let writer = RecordBatchWriter::try_new(
            url.as_str(),
            schema.clone(),
            partitions.clone(),
            Some(storage.clone()),
        )
        .map_err(|e| DeltaError::table(path, e))?;
        Ok(FileWriter::new(
            path,
            writer,
            partition_by,
            StatsScope::for_new(options.stats_columns.as_deref()),
            properties.clone(),
            layout.target_size,
        ))
    };
    write_streams(path, new_writer, streams, layout).await
}

/// `table`'s partition columns (none when its snapshot cannot be read).
pub(super) fn partition_columns(table: &DeltaTable) -> Vec<String> {
    table
        .snapshot()
        .map(|s| s.metadata().partition_columns().to_vec())
        .unwrap_or_default()
}

/// As [`write_files`], for the partitions of a result already running, each written by a writer from
/// `new_writer` (for a table, or for one not created yet).
pub(super) async fn write_streams(
    path: &Location,
    new_writer: impl Fn() -> Result<FileWriter, DeltaError>,
    streams: Vec<SendableRecordBatchStream>,
    layout: &Layout,
) -> Result<Written, DeltaError> {
    if let Some(ranges) = &layout.ranges {
        return write_clustered(path, new_writer, streams, ranges, layout.target_size).await;
    }
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let mut writer = new_writer()?;
        let path = path.clone();
        let partition_by = layout.partition_by.clone();
        let cuts = layout.cuts.clone();
        tasks.spawn(async move {
            let schema = writer.arrow_schema();
            let keep_views = writer.takes_views();
            let mut partitions = PartitionsSeen::new(&partition_by, &schema);
            let mut range = None;
            let mut rows = 0u64;
            let mut adds = Vec::new();
            let table_schema = (&schema, keep_views);
            while let Some(batch) = next_rows(&mut stream, &path, table_schema, &mut rows).await? {
                if let Some(partitions) = partitions.as_mut()
                    && partitions.moved_on(&batch)
                    && writer.buffer_len() >= MIN_EARLY_FINISH_BYTES
                {
                    adds.extend(writer.flush().await?);
                }
                if let Some(cuts) = &cuts {
                    let now = cuts.range_of(&batch);
                    if range.is_some() && now != range && writer.buffer_len() >= cuts.min_bytes {
                        adds.extend(writer.flush().await?);
                    }
                    range = now;
                }
                writer.write(batch).await?;
            }
            adds.extend(writer.flush().await?);
            Ok::<_, DeltaError>(Written { adds, rows })
        });
    }
    let mut written = Written::default();
    // On the first error the set is dropped, which stops the other writers.
    while let Some(done) = tasks.join_next().await {
        let part = done.map_err(|e| writer_stopped(path, &e))??;
        written.adds.extend(part.adds);
        written.rows += part.rows;
    }
    Ok(written)
}

/// The next batch of `stream` that holds rows, cast to the table's `schema` (string views kept with
/// `keep_views`); its rows are added to `rows`. `None` at the end of the stream.
async fn next_rows(
    stream: &mut SendableRecordBatchStream,
    path: &Location,
    (schema, keep_views): (&datafusion::arrow::datatypes::SchemaRef, bool),
    rows: &mut u64,
) -> Result<Option<RecordBatch>, DeltaError> {
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| DeltaError::query(path, e))?;
        if batch.num_rows() > 0 {
            *rows += batch.num_rows() as u64;
            return conform(path, batch, schema, keep_views).map(Some);
        }
    }
    Ok(None)
}

fn writer_stopped(path: &Location, error: &tokio::task::JoinError) -> DeltaError {
    DeltaError::Invalid {
        table: path.to_string(),
        message: format!("a file writer stopped: {error}"),
    }
}

/// A range's files are at least this large, by the write's estimate of its bytes, when it is written
/// by more than one writer, unless it is half a file of the target size or more.
const LEAST_SHARED_FILE: u64 = 8 * 1024 * 1024;

/// How many writers write each of `ranges`' files, on `cores` cores. Rows usually come range after
/// range (a first load follows the landing files' order), so a range of half a file or more gets a
/// writer per core: its files may overlap each other, never another range's. A write of fewer ranges
/// than cores (a merge rewriting the file or two its batch changed) gives each range enough writers
/// to keep every core busy, as long as each file stays [`LEAST_SHARED_FILE`] or more: with one
/// writer, encoding its rows would take one core while the others wait.
fn writers_per_range(ranges: &KeyRanges, target_size: u64, cores: usize) -> usize {
    let range_bytes = ranges.range_bytes();
    if range_bytes.saturating_mul(2) >= target_size {
        return cores;
    }
    if ranges.count() >= cores {
        return 1;
    }
    let files = usize::try_from(range_bytes / LEAST_SHARED_FILE).unwrap_or(usize::MAX);
    cores.div_ceil(ranges.count()).min(files).max(1)
}

/// [`write_streams`] clustered: writer tasks per key range, fed by the tasks that read the partitions
/// of the result and split each batch by range. The writers encode side by side; a few parts wait per
/// range, which bounds memory.
async fn write_clustered(
    path: &Location,
    new_writer: impl Fn() -> Result<FileWriter, DeltaError>,
    streams: Vec<SendableRecordBatchStream>,
    ranges: &KeyRanges,
    target_size: u64,
) -> Result<Written, DeltaError> {
    let mut writers = JoinSet::new();
    let mut senders = Vec::with_capacity(ranges.count());
    let mut schema = None;
    let cores = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    let per_range = writers_per_range(ranges, target_size, cores);
    for _ in 0..ranges.count() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<RecordBatch>(2 * per_range);
        senders.push(sender);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..per_range {
            let mut writer = new_writer()?;
            schema.get_or_insert_with(|| (writer.arrow_schema(), writer.takes_views()));
            let receiver = receiver.clone();
            writers.spawn(async move {
                loop {
                    let part = receiver.lock().await.recv().await;
                    let Some(part) = part else { break };
                    writer.write(part).await?;
                }
                writer.flush().await
            });
        }
    }
    let Some((schema, keep_views)) = schema else {
        return Ok(Written::default());
    };
    let mut routers = JoinSet::new();
    for mut stream in streams {
        let (path, ranges, senders, schema) = (
            path.clone(),
            ranges.clone(),
            senders.clone(),
            schema.clone(),
        );
        routers.spawn(async move {
            let mut rows = 0u64;
            let table_schema = (&schema, keep_views);
            while let Some(batch) = next_rows(&mut stream, &path, table_schema, &mut rows).await? {
                let parts = ranges.split(&batch).map_err(|e| DeltaError::Invalid {
                    table: path.to_string(),
                    message: format!("cannot split the rows by key range: {e}"),
                })?;
                for (range, part) in parts {
                    // A send fails only when the range's writer stopped on an error, reported below.
                    if senders[range].send(part).await.is_err() {
                        return Ok(rows);
                    }
                }
            }
            Ok::<_, DeltaError>(rows)
        });
    }
    drop(senders);
    let mut written = Written::default();
    let mut failed = None;
    while let Some(done) = routers.join_next().await {
        match done.map_err(|e| writer_stopped(path, &e)) {
            Ok(Ok(rows)) => written.rows += rows,
            Ok(Err(e)) | Err(e) => {
                // The readers stop: the writers' channels close and they finish.
                routers.abort_all();
                failed.get_or_insert(e);
            }
        }
    }
    while let Some(done) = writers.join_next().await {
        match done.map_err(|e| writer_stopped(path, &e)) {
            Ok(Ok(adds)) => written.adds.extend(adds),
            // A writer's own error says more than a reader's about a closed channel.
            Ok(Err(e)) | Err(e) => return Err(e),
        }
    }
    match failed {
        Some(error) => Err(error),
        None => Ok(written),
    }
}

/// The remove actions for the files of `table` whose scan file ids (the full URLs in a scan's file
/// column) are `ids`. Every id must be a file of the table's loaded version.
pub(super) fn removes(
    path: &Location,
    table: &DeltaTable,
    ids: &HashSet<String>,
) -> Result<Vec<Action>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let root = root_url(table);
    let mut actions = Vec::with_capacity(ids.len());
    for file in snapshot.log_data() {
        if ids.contains(scan_id(path, &root, &file.path())?.as_str()) {
            actions.push(Action::Remove(file.remove_action(true)));
        }
    }
    if actions.len() != ids.len() {
        return Err(DeltaError::Invalid {
            table: path.to_string(),
            message: format!(
                "{} of the {} files read for the rewrite are not in the table's version {:?}",
                ids.len() - actions.len(),
                ids.len(),
                table.version()
            ),
        });
    }
    Ok(actions)
}

/// The table's root URL, ending in `/`.
pub(super) fn root_url(table: &DeltaTable) -> url::Url {
    let mut root = table.log_store().root_url().clone();
    if !root.path().ends_with('/') {
        let with_slash = format!("{}/", root.path());
        root.set_path(&with_slash);
    }
    root
}

/// The id a scan's file column gives the file at `file` (a path in the log): its full URL.
pub(super) fn scan_id(
    path: &Location,
    root: &url::Url,
    file: &str,
) -> Result<url::Url, DeltaError> {
    root.join(file).map_err(|e| DeltaError::Invalid {
        table: path.to_string(),
        message: format!("file `{file}` has no URL under the table: {e}"),
    })
}

/// What a table's files say about a write into it, from the statistics in its log.
#[derive(Debug, Default, PartialEq)]
pub(super) struct FileStats {
    /// Bytes per row over all files (`None` without files or statistics).
    pub row_bytes: Option<u64>,
    /// Rows in the files asked about.
    pub rows: u64,
    /// Least and greatest value of the key in the files asked about (`None` when a file has none).
    pub key_bounds: Option<(i64, i64)>,
}

/// [`FileStats`] of `table`, for the files whose scan ids are `ids` and the integer column `key`.
pub(super) fn file_stats(
    path: &Location,
    table: &DeltaTable,
    ids: &HashSet<String>,
    key: &str,
) -> Result<FileStats, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let root = root_url(table);
    let (mut bytes, mut all_rows, mut rows) = (0u64, 0u64, 0u64);
    let mut bounds: Option<Option<(i64, i64)>> = None;
    for file in snapshot.log_data() {
        let records = file.num_records().unwrap_or(0) as u64;
        bytes += file.size().max(0) as u64;
        all_rows += records;
        if !ids.contains(scan_id(path, &root, &file.path())?.as_str()) {
            continue;
        }
        rows += records;
        let file_bounds = key_bounds(&file, key);
        bounds = Some(match (bounds, file_bounds) {
            (None, file_bounds) => file_bounds,
            (Some(Some((low, high))), Some((l, h))) => Some((low.min(l), high.max(h))),
            _ => None,
        });
    }
    Ok(FileStats {
        row_bytes: (all_rows > 0).then(|| bytes.div_ceil(all_rows)),
        rows,
        key_bounds: bounds.flatten(),
    })
}

/// The least and greatest value of the integer column `key` in `file`, by its statistics (`None`
/// without them, or when every value is NULL).
pub(super) fn key_bounds(
    file: &deltalake::kernel::LogicalFileView,
    key: &str,
) -> Option<(i64, i64)> {
    let stats: serde_json::Value = serde_json::from_str(&file.stats()?).ok()?;
    let value = |which: &str| stats.get(which)?.get(key)?.as_i64();
    value("minValues").zip(value("maxValues"))
}

/// The remove actions for every file of `table`'s loaded version.
pub(super) fn remove_all(path: &Location, table: &DeltaTable) -> Result<Vec<Action>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    Ok(snapshot
        .log_data()
        .into_iter()
        .map(|file| Action::Remove(file.remove_action(true)))
        .collect())
}

/// As [`discard`], for files written before their table existed ([`write_new_files`]).
pub(super) async fn discard_new(path: &Location, table: Option<&DeltaTable>, adds: &[Add]) {
    if let Some(table) = table {
        return discard(path, table, adds).await;
    }
    let table = path.url().map_err(|e| e.to_string()).and_then(|url| {
        deltalake::DeltaTableBuilder::from_url(url)
            .and_then(|b| b.with_storage_options(path.delta_options()).build())
            .map_err(|e| e.to_string())
    });
    match table {
        Ok(table) => discard(path, &table, adds).await,
        Err(error) => tracing::warn!(
            "{path}: could not remove {} unpublished file(s): {error}",
            adds.len()
        ),
    }
}

/// Deletes files written and never committed (best effort: a file left behind is invisible to
/// readers, and `medallion maintain` vacuums it).
pub(super) async fn discard(path: &Location, table: &DeltaTable, adds: &[Add]) {
    let store = table.log_store().object_store(None);
    for add in adds {
        let file = deltalake::Path::from_url_path(&add.path)
            .unwrap_or_else(|_| deltalake::Path::from(add.path.as_str()));
        if let Err(error) = store.delete(&file).await {
            tracing::warn!(
                "{path}: could not remove the unpublished file `{}`: {error}",
                add.path
            );
        }
    }
}

/// The operation recorded for an append of new files to `table`.
pub(super) fn append_operation(
    path: &Location,
    table: &DeltaTable,
) -> Result<DeltaOperation, DeltaError> {
    let partition_columns: Vec<String> = table
        .snapshot()
        .map_err(|e| DeltaError::table(path, e))?
        .metadata()
        .partition_columns()
        .to_vec();
    Ok(DeltaOperation::Write {
        mode: deltalake::protocol::SaveMode::Append,
        partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
        predicate: None,
    })
}

/// Commits `actions` (added and removed files) to `table` as one version, checked for conflicts with
/// any commit made since the table was loaded; returns the version.
pub(super) async fn commit(
    path: &Location,
    table: &DeltaTable,
    actions: Vec<Action>,
    operation: DeltaOperation,
    properties: CommitProperties,
) -> Result<u64, DeltaError> {
    commit_raw(table, actions, operation, properties)
        .await
        .map_err(|e| DeltaError::table(path, e))
}

/// As [`commit`], with delta-rs's error, for callers that tell conflicts apart.
pub(super) async fn commit_raw(
    table: &DeltaTable,
    actions: Vec<Action>,
    operation: DeltaOperation,
    properties: CommitProperties,
) -> Result<u64, DeltaTableError> {
    let snapshot = table.snapshot()?;
    let finalized = CommitBuilder::from(properties)
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await?;
    Ok(finalized.version() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::{
        arrow::{
            array::{Int64Array, StringArray},
            datatypes::{Field, Schema},
        },
        datasource::MemTable,
    };
    use std::sync::Arc;

    #[test]
    fn partitions_move_on_when_a_batch_holds_none_of_those_seen() {
        let schema = Schema::new(vec![
            Field::new("year", DataType::Int32, false),
            Field::new("v", DataType::Utf8, true),
        ]);
        let batch = |years: &[i32]| {
            RecordBatch::try_new(
                Arc::new(schema.clone()),
                vec![
                    Arc::new(datafusion::arrow::array::Int32Array::from(years.to_vec())),
                    Arc::new(StringArray::from(vec!["x"; years.len()])),
                ],
            )
            .unwrap()
        };
        assert!(PartitionsSeen::new(&[], &schema).is_none(), "unpartitioned");
        let mut seen = PartitionsSeen::new(&["year".to_string()], &schema).unwrap();
        assert!(!seen.moved_on(&batch(&[2010, 2010])), "the first batch");
        assert!(!seen.moved_on(&batch(&[2010, 2011])), "2010 goes on");
        assert!(!seen.moved_on(&batch(&[2011])), "2011 was seen");
        assert!(seen.moved_on(&batch(&[2012, 2013])), "neither was seen");
        assert!(!seen.moved_on(&batch(&[2013, 2014])));
        // Rows of every partition in every batch (not clustered) never move on.
        let mut mixed = PartitionsSeen::new(&["year".to_string()], &schema).unwrap();
        for _ in 0..5 {
            assert!(!mixed.moved_on(&batch(&[2010, 2011, 2012])));
        }
    }

    fn keys_of(batch: &RecordBatch) -> Vec<Option<i64>> {
        let keys = batch.column(0).as_primitive::<Int64Type>();
        (0..keys.len())
            .map(|i| keys.is_valid(i).then(|| keys.value(i)))
            .collect()
    }

    #[test]
    fn a_range_gets_a_writer_per_core_when_it_is_half_a_file_or_the_cores_would_wait() {
        const MIB: u64 = 1024 * 1024;
        // 16 bytes a row, ranges of files of `range_target`, the table's files of 128 MiB.
        let ranged = |rows: u64, range_target: u64, cores: usize| {
            let ranges = KeyRanges::for_write("k", (0, 1 << 40), rows, Some(16), range_target);
            (ranges.count(), writers_per_range(&ranges, 128 * MIB, cores))
        };
        let writers = |rows: u64, cores: usize| ranged(rows, 128 * MIB, cores);
        // A first load of 10M rows: two ranges of 76 MiB, each over half a file.
        assert_eq!(writers(10_000_000, 2), (2, 2));
        // A merge rewriting 3.4M rows (52 MiB): one range, under half a file, on two cores.
        assert_eq!(writers(3_400_000, 2), (1, 2));
        // On one core, one writer.
        assert_eq!(writers(3_400_000, 1), (1, 1));
        // A small merge (1.6 MiB): two files would be under 8 MiB each.
        assert_eq!(writers(100_000, 2), (1, 1));
        // 1M rows (15 MiB) on two cores: each file would be under 8 MiB.
        assert_eq!(writers(1_000_000, 2), (1, 1));
        // Four ranges of 13 MiB on two cores: no core waits, and no range is half a file.
        assert_eq!(ranged(3_400_000, 16 * MIB, 2), (4, 1));
        // Two ranges of 40 MiB on four cores: two writers each keep the four busy.
        assert_eq!(ranged(5_200_000, 48 * MIB, 4), (2, 2));
        // One range of 20 MiB on four cores: two files of 10 MiB, not four of 5 MiB.
        assert_eq!(ranged(1_300_000, 128 * MIB, 4), (1, 2));
    }

    #[test]
    fn key_ranges_are_as_many_as_files_of_the_target_size_and_split_rows_by_key() {
        // 100 rows of 10 bytes in files of 250 bytes: four ranges of 25 keys.
        let ranges = KeyRanges::for_write("k", (1, 100), 100, Some(10), 250);
        assert_eq!(ranges.count(), 4);
        assert_eq!(
            [1, 25, 26, 50, 51, 100, -5, 500].map(|k| ranges.index(k)),
            [0, 0, 1, 1, 2, 3, 0, 3],
            "keys outside the bounds go to the first or last range"
        );
        assert_eq!(
            KeyRanges::for_write("k", (1, 100), 10, Some(10), 250).count(),
            1,
            "one file holds them all"
        );
        assert_eq!(
            KeyRanges::for_write("k", (5, 6), 1000, None, 10).count(),
            2,
            "no more ranges than keys"
        );
        assert_eq!(
            KeyRanges::for_write("k", (i64::MIN, i64::MAX), 10, Some(10), 1).count(),
            10,
            "no more ranges than rows"
        );
        assert_eq!(
            KeyRanges::for_write("k", (0, 1 << 40), 1 << 30, None, 1).count() as u64,
            MAX_RANGES
        );

        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(100),
                    Some(1),
                    None,
                    Some(60),
                    Some(30),
                ])),
                Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e"])),
            ],
        )
        .unwrap();
        let parts: Vec<(usize, Vec<Option<i64>>)> = ranges
            .split(&batch)
            .unwrap()
            .iter()
            .map(|(range, rows)| (*range, keys_of(rows)))
            .collect();
        assert_eq!(
            parts,
            vec![
                (0, vec![Some(1), None]),
                (1, vec![Some(30)]),
                (2, vec![Some(60)]),
                (3, vec![Some(100)]),
            ]
        );
    }

    /// Two partitions giving their rows one range of days after another, as slices do: with the
    /// ranges' cuts, each writer finishes a file at each cut, so that no file holds two ranges'
    /// days; without, each writer writes one file holding every day.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_given_cuts_finishes_its_file_where_its_rows_move_on_to_the_next_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Date32, true),
            Field::new("k", DataType::Int64, false),
        ]));
        let table =
            crate::delta::create_if_missing(&path, &schema, &crate::delta::TableOptions::default())
                .await
                .unwrap();
        // Days 0..30 (1970-01-01 on), cut at days 10 and 20; a partition's NULL days come last,
        // in the last range, as a slice gives them.
        let batch = |days: std::ops::Range<i32>, null: bool| {
            let mut values: Vec<Option<i32>> = days.map(Some).collect();
            if null {
                values.push(None);
            }
            let keys = Int64Array::from_iter_values(0..values.len() as i64);
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(datafusion::arrow::array::Date32Array::from(values)),
                    Arc::new(keys),
                ],
            )
            .unwrap()
        };
        let partition = || {
            vec![
                batch(0..5, false),
                batch(5..10, false),
                batch(10..20, false),
                batch(20..30, true),
            ]
        };
        let ctx = crate::delta::session(None).unwrap();
        let source = MemTable::try_new(schema.clone(), vec![partition(), partition()]).unwrap();
        let frame = ctx.read_table(Arc::new(source)).unwrap();
        let days = |written: &Written| {
            let mut days: Vec<(i64, i64)> = written
                .adds
                .iter()
                .map(|add| {
                    let stats: serde_json::Value =
                        serde_json::from_str(add.stats.as_deref().unwrap()).unwrap();
                    let day = |bound: &str| {
                        let text = stats[bound]["day"].as_str().unwrap();
                        let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap();
                        (date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days()
                    };
                    (day("minValues"), day("maxValues"))
                })
                .collect();
            days.sort();
            days
        };
        let cut = Layout {
            cuts: Some(Cuts {
                min_bytes: 0,
                ..Cuts::new("day".into(), vec![10, 20])
            }),
            ..Layout::unclustered(None)
        };
        let written = write_files(&path, &table, frame.clone(), &cut)
            .await
            .unwrap();
        assert_eq!(written.rows, 62);
        assert_eq!(
            days(&written),
            vec![(0, 9), (0, 9), (10, 19), (10, 19), (20, 29), (20, 29)]
        );
        // Below the bytes a writer writes before it may cut, ranges share its file.
        let big = Layout {
            cuts: Some(Cuts::new("day".into(), vec![10, 20])),
            ..Layout::unclustered(None)
        };
        let whole = write_files(&path, &table, frame.clone(), &big)
            .await
            .unwrap();
        assert_eq!(days(&whole), vec![(0, 29), (0, 29)]);
        let uncut = write_files(&path, &table, frame, &Layout::unclustered(None))
            .await
            .unwrap();
        assert_eq!(days(&uncut), vec![(0, 29), (0, 29)]);
    }

    /// Keys in no order, over two partitions: four files, one per range, every row written once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clustered_write_keeps_each_key_range_in_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let table =
            crate::delta::create_if_missing(&path, &schema, &crate::delta::TableOptions::default())
                .await
                .unwrap();
        // Keys 0..4000 scattered: key = i * 1237 mod 4000 (1237 and 4000 are coprime).
        let batch = |part: i64, n: i64| {
            let keys: Vec<i64> = (0..1000)
                .map(|i| ((part * 1000 + i) * 1237 + n) % 4000)
                .collect();
            let values: Vec<String> = keys.iter().map(|k| format!("v{k}")).collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(StringArray::from(values)),
                ],
            )
            .unwrap()
        };
        let partitions = vec![
            vec![batch(0, 0), batch(1, 0)],
            vec![batch(2, 0), batch(3, 0)],
        ];
        let ctx = crate::delta::session(None).unwrap();
        let source = MemTable::try_new(schema.clone(), partitions).unwrap();
        let frame = ctx.read_table(Arc::new(source)).unwrap();
        // Ranges of 10,000 bytes: small against files of 128 MiB, one writer each.
        let layout = Layout {
            target_size: TARGET_FILE_SIZE,
            ranges: Some(KeyRanges::for_write("k", (0, 3999), 4000, Some(10), 10_000)),
            partition_by: Vec::new(),
            cuts: None,
        };
        let written = write_files(&path, &table, frame.clone(), &layout)
            .await
            .unwrap();
        assert_eq!(written.rows, 4000);
        assert_eq!(written.adds.len(), 4, "one file per range");
        // Against files of 10,000 bytes, a range is big: a writer per core, each file in one range.
        let big = Layout {
            target_size: 10_000,
            ..layout.clone()
        };
        let hot = write_files(&path, &table, frame, &big).await.unwrap();
        assert_eq!(hot.rows, 4000);
        assert!((4..=8).contains(&hot.adds.len()), "{}", hot.adds.len());
        for add in &hot.adds {
            let stats: serde_json::Value =
                serde_json::from_str(add.stats.as_deref().unwrap()).unwrap();
            let (low, high) = (
                stats["minValues"]["k"].as_i64().unwrap(),
                stats["maxValues"]["k"].as_i64().unwrap(),
            );
            assert_eq!(low / 1000, high / 1000, "{low}..={high} spans two ranges");
        }
        let operation = append_operation(&path, &table).unwrap();
        let adds: Vec<Add> = written.adds.clone();
        commit(
            &path,
            &table,
            adds.into_iter().map(Action::Add).collect(),
            operation,
            CommitProperties::default(),
        )
        .await
        .unwrap();

        let table = crate::delta::open(&path).await.unwrap().unwrap();
        let root = root_url(&table);
        let mut ranges = Vec::new();
        for add in &written.adds {
            let id = scan_id(&path, &root, &add.path).unwrap().to_string();
            let stats = file_stats(&path, &table, &HashSet::from([id]), "k").unwrap();
            ranges.push((stats.key_bounds, stats.rows));
        }
        ranges.sort();
        assert_eq!(
            ranges,
            vec![
                (Some((0, 999)), 1000),
                (Some((1000, 1999)), 1000),
                (Some((2000, 2999)), 1000),
                (Some((3000, 3999)), 1000),
            ]
        );
        let all = file_stats(&path, &table, &HashSet::new(), "k").unwrap();
        assert_eq!((all.rows, all.key_bounds), (0, None), "no file asked about");
        assert!(all.row_bytes.is_some_and(|b| b > 0));

        // Rows that do not fit the table stop the write with the reader's error, not a hang or a
        // "writer stopped".
        let frame = ctx
            .sql("SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS t(k, w)")
            .await
            .unwrap();
        let error = write_files(&path, &table, frame, &layout)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no column `v`"), "{error}");
    }
}
