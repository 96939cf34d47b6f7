//! Append writes. [`BatchAppender`] streams batches into Parquet files as they come (bounded memory)
//! and commits them all in one Delta commit at the end; [`append_batches`] appends a few small batches.

use crate::storage::Location;

use std::sync::Arc;

use datafusion::arrow::{
    array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, StringViewArray},
    buffer::{Buffer, OffsetBuffer, ScalarBuffer},
    compute::cast,
    datatypes::{DataType, SchemaRef},
    error::ArrowError,
};
use deltalake::{
    DeltaTable,
    kernel::{Action, Add},
    protocol::SaveMode,
};
use tokio::{sync::mpsc, task::JoinSet};

use super::{
    CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing, file_writer::FileWriter,
};

use super::files::{Layout, TARGET_FILE_SIZE};

/// A streaming append into one table, committed once by [`BatchAppender::commit`]. Dropping it without
/// committing leaves the table unchanged (the written files are unreferenced and vacuumed later).
///
/// Batches go in turn to one Parquet writer per runtime worker, each on its own task: encoding and
/// compression, most of an append's work, run on every core while the caller produces the next batch.
pub struct BatchAppender {
    path: Location,
    table: DeltaTable,
    schema: SchemaRef,
    /// Whether the writers take string views as they are (see [`FileWriter::takes_views`]).
    takes_views: bool,
    writers: Vec<mpsc::Sender<RecordBatch>>,
    tasks: JoinSet<Result<Vec<Add>, DeltaError>>,
    next: usize,
    rows: u64,
    /// Commit at exactly the version after [`BatchAppender::base_version`] or not at all.
    exact_version: bool,
    /// The lineage of [`BatchAppender::commit`].
    meta: CommitMeta,
}

impl BatchAppender {
    /// Opens (creating if needed) the table at `path` for appending batches of `schema`.
    pub async fn open(
        path: &Location,
        schema: &SchemaRef,
        options: &TableOptions,
        meta: &CommitMeta,
    ) -> Result<BatchAppender, DeltaError> {
        let table = create_if_missing(path, schema, options).await?;
        let count = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .max(1);
        let mut writers = Vec::with_capacity(count);
        let mut tasks = JoinSet::new();
        let mut table_schema = None;
        let properties = super::table_writer_properties(&table);
        for _ in 0..count {
            let mut writer = FileWriter::for_table(
                path,
                &table,
                properties.clone(),
                options.target_file_size.unwrap_or(TARGET_FILE_SIZE),
            )?;
            // Every writer of the table is of one kind: the first says what they take.
            table_schema.get_or_insert_with(|| (writer.arrow_schema(), writer.takes_views()));
            // One batch waiting per writer: memory stays bounded when the writers are slower.
            let (sender, mut receiver) = mpsc::channel::<RecordBatch>(1);
            tasks.spawn(async move {
                while let Some(batch) = receiver.recv().await {
                    writer.write(batch).await?;
                }
                writer.flush().await
            });
            writers.push(sender);
        }
        let (schema, takes_views) = table_schema.ok_or_else(|| DeltaError::Invalid {
            table: path.to_string(),
            message: "no writer for the append".into(),
        })?;
        Ok(BatchAppender {
            path: path.clone(),
            table,
            schema,
            takes_views,
            writers,
            tasks,
            next: 0,
            rows: 0,
            exact_version: false,
            meta: meta.clone(),
        })
    }

    /// Makes the commit land at exactly `base_version + 1`: when another writer commits first, the
    /// commit fails with [`DeltaError::Conflict`] instead of being rebased onto the newer version. For
    /// rows that record the version they are committed in (Bronze's `_batch_id`).
    pub fn at_next_version(mut self) -> BatchAppender {
        self.exact_version = true;
        self
    }

    /// Version the table had when the appender opened it.
    pub fn base_version(&self) -> Option<u64> {
        self.table.version()
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), DeltaError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = conform(&self.path, batch, &self.schema, self.takes_views)?;
        self.rows += batch.num_rows() as u64;
        let writer = &self.writers[self.next % self.writers.len()];
        self.next += 1;
        if writer.send(batch).await.is_err() {
            // The writer stopped: its error says why.
            return Err(self.stopped_writer_error().await);
        }
        Ok(())
    }

    /// The error of the first writer task that failed.
    async fn stopped_writer_error(&mut self) -> DeltaError {
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(Err(error)) => return error,
                Err(error) => return self.writer_stopped(&error.to_string()),
                Ok(Ok(_)) => {}
            }
        }
        self.writer_stopped("it ended early")
    }

    fn writer_stopped(&self, why: &str) -> DeltaError {
        DeltaError::Invalid {
            table: self.path.to_string(),
            message: format!("a file writer stopped: {why}"),
        }
    }

    /// Commits everything written, with the lineage given to [`BatchAppender::open`]; with no rows,
    /// commits nothing.
    pub async fn commit(self) -> Result<WriteMetrics, DeltaError> {
        let meta = self.meta.clone();
        self.commit_with(&meta, Vec::new()).await
    }

    /// As [`BatchAppender::commit`], with `extra` entries in the commit info (and `meta`'s lineage
    /// when it names a run).
    pub async fn commit_with(
        mut self,
        meta: &CommitMeta,
        extra: Vec<(String, serde_json::Value)>,
    ) -> Result<WriteMetrics, DeltaError> {
        // Closing the channels ends the writers, which flush their last files.
        self.writers.clear();
        let mut adds = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(written) => adds.extend(written?),
                Err(error) => return Err(self.writer_stopped(&error.to_string())),
            }
        }
        if self.rows == 0 {
            return Ok(WriteMetrics::default());
        }
        let mut properties = meta.properties_with(extra);
        if self.exact_version {
            properties = properties.with_max_retries(0);
        }
        let operation = super::files::append_operation(&self.path, &self.table)?;
        let files_added = adds.len() as u64;
        let actions = adds.into_iter().map(Action::Add).collect();
        let version = super::files::commit_raw(&self.table, actions, operation, properties)
            .await
            .map_err(|e| match e {
                deltalake::DeltaTableError::VersionAlreadyExists(_)
                | deltalake::DeltaTableError::Transaction {
                    source: deltalake::kernel::transaction::TransactionError::MaxCommitAttempts(_),
                } if self.exact_version => DeltaError::Conflict {
                    table: self.path.to_string(),
                },
                e => DeltaError::table(&self.path, e),
            })?;
        Ok(WriteMetrics {
            version: Some(version),
            rows_source: None,
            rows_written: self.rows,
            rows_inserted: self.rows,
            files_added,
            ..WriteMetrics::default()
        })
    }
}

/// Casts `batch` to the table's arrow schema, matching columns by name. With `keep_views`, string views
/// stay views where the table stores strings (for a writer that encodes them as strings, see
/// [`super::file_writer::FileWriter::takes_views`]), and the batch's schema says so.
pub(super) fn conform(
    path: &Location,
    batch: RecordBatch,
    schema: &SchemaRef,
    keep_views: bool,
) -> Result<RecordBatch, DeltaError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let invalid = |message: String| DeltaError::Invalid {
        table: path.to_string(),
        message,
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut fields = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch.column_by_name(field.name()).ok_or_else(|| {
            invalid(format!(
                "the data has no column `{}` that the table has",
                field.name()
            ))
        })?;
        let column = match (column.data_type(), field.data_type()) {
            (DataType::Utf8View, DataType::Utf8) if keep_views => {
                fields.push(Arc::new(
                    field.as_ref().clone().with_data_type(DataType::Utf8View),
                ));
                columns.push(column.clone());
                continue;
            }
            (DataType::Utf8View, DataType::Utf8) => {
                views_to_strings(column.as_string_view()).map(|s| Arc::new(s) as ArrayRef)
            }
            _ => cast(column, field.data_type()),
        };
        let column = column.map_err(|e| {
            invalid(format!(
                "column `{}` cannot be stored as {}: {e}",
                field.name(),
                field.data_type()
            ))
        })?;
        fields.push(field.clone());
        columns.push(column);
    }
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ));
    RecordBatch::try_new(schema, columns).map_err(|e| invalid(e.to_string()))
}

/// `views` as a string array, its bytes copied in one pass into one buffer; an error when they exceed a
/// string array's 2 GiB (where arrow's cast panics). Arrow's cast does the same through a builder, value
/// by value (a null bit and a capacity check each). The string columns a query hands to medallion's
/// writers all take this step: DataFusion reads and computes strings as views, Delta stores strings.
fn views_to_strings(views: &StringViewArray) -> Result<StringArray, ArrowError> {
    let nulls = views.nulls();
    let valid = |row: usize| nulls.is_none_or(|n| n.is_valid(row));
    // The low 32 bits of a view are its value's length.
    let total: usize = (0..views.len())
        .filter(|&row| valid(row))
        .map(|row| views.views()[row] as u32 as usize)
        .sum();
    i32::try_from(total).map_err(|_| ArrowError::OffsetOverflowError(total))?;
    let mut bytes: Vec<u8> = Vec::with_capacity(total);
    let mut offsets: Vec<i32> = Vec::with_capacity(views.len() + 1);
    offsets.push(0);
    for row in 0..views.len() {
        if valid(row) {
            bytes.extend_from_slice(views.value(row).as_bytes());
        }
        // At most `total` bytes, which fits in i32 (checked above).
        offsets.push(bytes.len() as i32);
    }
    let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
    // SAFETY: the offsets start at 0, never decrease and end at `bytes.len()`; between two offsets lies
    // one whole value of `views`, a `&str`, so every range is valid UTF-8. (`try_new` would check the
    // UTF-8 of every byte again.) The nulls are `views`' own, one per row.
    Ok(unsafe { StringArray::new_unchecked(offsets, Buffer::from_vec(bytes), nulls.cloned()) })
}

/// Appends a few in-memory batches in one commit (state tables, small results).
pub async fn append_batches(
    path: &Location,
    batches: Vec<RecordBatch>,
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<WriteMetrics, DeltaError> {
    let Some(first) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(WriteMetrics::default());
    };
    let table = create_if_missing(path, &first.schema(), options).await?;
    let schema = table
        .snapshot()
        .map_err(|e| DeltaError::table(path, e))?
        .snapshot()
        .arrow_schema();
    let mut conformed = Vec::with_capacity(batches.len());
    let mut rows = 0;
    for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
        rows += batch.num_rows() as u64;
        conformed.push(conform(path, batch, &schema, false)?);
    }
    let properties = super::table_writer_properties(&table);
    let table = table
        .write(conformed)
        .with_writer_properties(properties)
        .with_save_mode(SaveMode::Append)
        .with_commit_properties(meta.properties())
        .await
        .map_err(|e| DeltaError::table(path, e))?;
    Ok(WriteMetrics {
        version: table.version(),
        rows_source: None,
        rows_written: rows,
        rows_inserted: rows,
        ..WriteMetrics::default()
    })
}

/// Appends a query's result, streamed, in one commit.
pub async fn append_frame(
    path: &Location,
    frame: datafusion::prelude::DataFrame,
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<WriteMetrics, DeltaError> {
    let layout = Layout::unclustered(options.target_file_size);
    append_frame_with(path, frame, options, meta, Vec::new(), &layout).await
}

/// As [`append_frame`], with `extra` entries in the commit info, the files laid out as `layout` says.
/// The result's partitions are written in parallel ([`super::files::write_files`]).
pub(super) async fn append_frame_with(
    path: &Location,
    frame: datafusion::prelude::DataFrame,
    options: &TableOptions,
    meta: &CommitMeta,
    extra: Vec<(String, serde_json::Value)>,
    layout: &Layout,
) -> Result<WriteMetrics, DeltaError> {
    let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
    let table = create_if_missing(path, &schema, options).await?;
    let written = super::files::write_files(path, &table, frame, layout).await?;
    commit_written(path, &table, written, meta, extra).await
}

/// Commits `written` (files of `table` not committed yet) as an append; nothing for no rows.
pub(super) async fn commit_written(
    path: &Location,
    table: &deltalake::DeltaTable,
    written: super::files::Written,
    meta: &CommitMeta,
    extra: Vec<(String, serde_json::Value)>,
) -> Result<WriteMetrics, DeltaError> {
    if written.rows == 0 {
        return Ok(WriteMetrics::default());
    }
    let operation = super::files::append_operation(path, table)?;
    let files_added = written.adds.len() as u64;
    let actions = written
        .adds
        .into_iter()
        .map(deltalake::kernel::Action::Add)
        .collect();
    let version =
        super::files::commit(path, table, actions, operation, meta.properties_with(extra)).await?;
    Ok(WriteMetrics {
        version: Some(version),
        rows_source: None,
        rows_written: written.rows,
        rows_inserted: written.rows,
        files_added,
        ..WriteMetrics::default()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Int64Array, StringArray},
        datatypes::{DataType, Field, Schema},
    };
    use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// A view array becomes the same strings (inline and out-of-line values, NULLs, a slice), as arrow's
    /// cast makes them.
    #[test]
    fn views_become_the_strings_arrows_cast_makes() {
        let values: Vec<Option<String>> = (0..300)
            .map(|i| match i % 7 {
                0 => None,
                1 => Some(String::new()),
                2 => Some(format!("short {i}")),
                3 => Some(format!("a value longer than twelve bytes, number {i}")),
                4 => Some("exactly12byt".into()),
                5 => Some(format!("ünïcödé {i} ✓")),
                _ => Some(format!("{i}")),
            })
            .collect();
        let views = StringViewArray::from_iter(values.iter().map(|v| v.as_deref()));
        for array in [views.clone(), views.slice(5, 200), views.slice(299, 1)] {
            let ours = views_to_strings(&array).unwrap();
            let arrows = cast(&array, &DataType::Utf8).unwrap();
            assert_eq!(&ours as &dyn Array, arrows.as_ref());
            assert_eq!(ours.null_count(), array.null_count());
        }
    }

    /// Parquet encodings of the files medallion writes: an integer column of distinct values (a key)
    /// outgrows the small dictionary and goes on as DELTA_BINARY_PACKED; columns of few values (a
    /// string, an integer) keep their dictionary; every value reads back as written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_outgrow_the_dictionary_into_delta_packing_and_few_values_keep_theirs() {
        use deltalake::parquet::{
            arrow::arrow_reader::ParquetRecordBatchReaderBuilder, basic::Encoding,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let schema = Arc::new(Schema::new(vec![
            Field::new("dms_id", DataType::Int64, false),
            Field::new("city", DataType::Utf8, true),
            Field::new("mcc", DataType::Int64, true),
        ]));
        let meta = CommitMeta {
            run_id: "r".into(),
            stage: "s".into(),
        };
        let rows = 60_000i64;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("city {}", i % 10)),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..rows).map(|i| 5000 + i % 7),
                )),
            ],
        )
        .unwrap();
        let written = append_batches(&path, vec![batch], &TableOptions::default(), &meta)
            .await
            .unwrap();
        assert_eq!(written.rows_written, rows as u64);

        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .collect();
        assert_eq!(files.len(), 1);
        let footer = SerializedFileReader::new(std::fs::File::open(&files[0]).unwrap()).unwrap();
        for group in footer.metadata().row_groups() {
            let encodings = |i: usize| group.column(i).encodings().collect::<Vec<_>>();
            assert!(
                encodings(0).contains(&Encoding::DELTA_BINARY_PACKED),
                "{:?}",
                encodings(0)
            );
            for few in [1, 2] {
                assert!(
                    encodings(few).contains(&Encoding::RLE_DICTIONARY),
                    "{:?}",
                    encodings(few)
                );
                assert!(!encodings(few).contains(&Encoding::DELTA_BINARY_PACKED));
            }
        }
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&files[0]).unwrap())
                .unwrap()
                .build()
                .unwrap();
        // The write may reorder the rows; each reads back whole.
        let mut read: Vec<(i64, String, i64)> = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let (ids, cities, mccs) = (
                batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap(),
                batch
                    .column(1)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap(),
                batch
                    .column(2)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap(),
            );
            read.extend((0..batch.num_rows()).map(|row| {
                let city = cities.value(row).to_string();
                (ids.value(row), city, mccs.value(row))
            }));
        }
        read.sort_unstable();
        let expected: Vec<_> = (0..rows)
            .map(|i| (i, format!("city {}", i % 10), 5000 + i % 7))
            .collect();
        assert_eq!(read, expected);
    }

    /// A table created with statistics columns: its files carry min and max for those only, in the
    /// Delta log and in the Parquet footers, and the table says so for every later writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_with_statistics_columns_writes_statistics_for_those_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let schema = Arc::new(Schema::new(vec![
            Field::new("raw", DataType::Utf8, true),
            Field::new("_batch_id", DataType::Int64, false),
        ]));
        let options = TableOptions {
            stats_columns: Some(vec!["_batch_id".to_string()]),
            ..TableOptions::default()
        };
        let meta = CommitMeta {
            run_id: "r".into(),
            stage: "s".into(),
        };
        let mut appender = BatchAppender::open(&path, &schema, &options, &meta)
            .await
            .unwrap();
        for part in 0..3i64 {
            let raw: Vec<String> = (0..1000).map(|i| format!("v{}", part * 1000 + i)).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(raw)),
                    Arc::new(Int64Array::from(vec![part + 1; 1000])),
                ],
            )
            .unwrap();
            appender.write(batch).await.unwrap();
        }
        assert_eq!(appender.commit().await.unwrap().rows_written, 3000);

        let log = std::fs::read_to_string(dir.path().join("_delta_log/00000000000000000001.json"))
            .unwrap();
        let adds: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter_map(|action| action.get("add").cloned())
            .collect();
        assert!(!adds.is_empty());
        let (mut low, mut high) = (i64::MAX, i64::MIN);
        for add in &adds {
            let stats: serde_json::Value =
                serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
            assert_eq!(stats["numRecords"].as_i64().unwrap() % 1000, 0, "{stats}");
            assert!(stats["minValues"].get("raw").is_none(), "{stats}");
            low = low.min(stats["minValues"]["_batch_id"].as_i64().unwrap());
            high = high.max(stats["maxValues"]["_batch_id"].as_i64().unwrap());
            let file = std::fs::File::open(dir.path().join(add["path"].as_str().unwrap())).unwrap();
            let footer = SerializedFileReader::new(file).unwrap();
            for group in footer.metadata().row_groups() {
                assert!(group.column(0).statistics().is_none(), "raw has statistics");
                assert!(group.column(1).statistics().is_some(), "_batch_id has none");
            }
        }
        assert_eq!((low, high), (1, 3));

        let table = super::super::open(&path).await.unwrap().unwrap();
        let configuration = table.snapshot().unwrap().metadata().configuration().clone();
        assert_eq!(
            configuration.get("delta.dataSkippingStatsColumns"),
            Some(&"_batch_id".to_string())
        );
        let properties = super::super::table_writer_properties(&table);
        use deltalake::parquet::{file::properties::EnabledStatistics, schema::types::ColumnPath};
        assert_eq!(
            properties.statistics_enabled(&ColumnPath::from("raw")),
            EnabledStatistics::None
        );
        assert_eq!(
            properties.statistics_enabled(&ColumnPath::from("_batch_id")),
            EnabledStatistics::Page
        );
    }
}
