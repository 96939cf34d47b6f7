//! A stage's scratch space: query results computed once and read back as tables. A stage reads its
//! output several times (expectations, the split into kept and quarantined rows, the cdc steps);
//! materialized here, the expensive plan behind it (file scans, parsing UDFs) runs once. A result up to
//! the scratch's memory budget stays in memory; a larger one goes in full to local Arrow IPC files, where
//! it waits in the page cache rather than in the process's memory. On disk each column has its own file,
//! so that a query reads only the columns it names: most steps need a key or two of a wide result, and
//! a string column in long runs of one value (a file name) is stored once per run.

use std::{
    fs::File,
    io::BufWriter,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use datafusion::{
    arrow::{
        array::{ArrayRef, AsArray},
        buffer::Buffer,
        compute::filter_record_batch,
        datatypes::{Schema, SchemaRef},
        ipc::{Block, reader::FileDecoder, writer::FileWriter},
        record_batch::{RecordBatch, RecordBatchOptions},
    },
    catalog::{Session, TableProvider},
    datasource::{MemTable, TableType},
    error::DataFusionError,
    execution::{SendableRecordBatchStream, TaskContext},
    logical_expr::Expr,
    physical_expr::LexOrdering,
    physical_plan::{
        ExecutionPlan,
        stream::RecordBatchStreamAdapter,
        streaming::{PartitionStream, StreamingTableExec},
    },
    prelude::{DataFrame, SessionContext},
};
use futures::StreamExt;

use super::EngineError;
use crate::storage::PieceWriter;

/// Environment variable naming the directory scratch files go under (default: the system's temp dir).
pub const SCRATCH_DIR_ENV: &str = "MEDALLION_SCRATCH_DIR";

/// Environment variable setting the bytes one result may hold in memory (`0`: always on disk).
pub const SCRATCH_MEMORY_ENV: &str = "MEDALLION_SCRATCH_MEMORY";

/// Scratch directories are named `medallion-<pid>-<random>`.
const PREFIX: &str = "medallion-";

/// Bytes one result may hold in memory when the run has no memory limit.
const DEFAULT_BUDGET: usize = 256 * 1024 * 1024;

/// A directory of materialized results, removed with everything in it when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
    budget: usize,
}

impl Scratch {
    /// A new directory under `$MEDALLION_SCRATCH_DIR`, or the system's temp dir. A result holds at most
    /// `$MEDALLION_SCRATCH_MEMORY` bytes in memory; by default an eighth of the memory limit, or 256 MiB.
    pub fn new(memory_limit: Option<usize>) -> Result<Scratch, EngineError> {
        let parent = std::env::var_os(SCRATCH_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let budget = match std::env::var(SCRATCH_MEMORY_ENV) {
            Ok(value) => value.trim().parse().map_err(|_| EngineError::Invalid {
                what: format!("${SCRATCH_MEMORY_ENV}"),
                message: format!("`{value}` is not a number of bytes"),
            })?,
            Err(_) => memory_limit.map_or(DEFAULT_BUDGET, |limit| limit / 8),
        };
        Scratch::new_in(&parent, budget)
    }

    /// A new directory under `parent` holding up to `budget` bytes of a result in memory (0: always on
    /// disk). The directories of processes that ended without removing theirs (killed, crashed) go first.
    pub fn new_in(parent: &Path, budget: usize) -> Result<Scratch, EngineError> {
        let invalid = |e: std::io::Error| EngineError::Invalid {
            what: format!(
                "cannot create a scratch directory under {}",
                parent.display()
            ),
            message: e.to_string(),
        };
        std::fs::create_dir_all(parent).map_err(invalid)?;
        remove_orphans(parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir_in(parent)
            .map_err(invalid)?;
        Ok(Scratch { dir, budget })
    }

    /// Runs `frame` (its partitions in parallel) and registers its result in `ctx` as `name`; returns its
    /// row count. `name` must be new to this scratch.
    pub async fn materialize(
        &self,
        ctx: &SessionContext,
        name: &str,
        frame: DataFrame,
    ) -> Result<u64, EngineError> {
        let streams = frame
            .execute_stream_partitioned()
            .await
            .map_err(|e| EngineError::query(format!("materializing `{name}`"), e))?;
        self.materialize_streams(ctx, name, streams).await
    }

    /// As [`Scratch::materialize`], for the partitions of a result already running.
    pub async fn materialize_streams(
        &self,
        ctx: &SessionContext,
        name: &str,
        streams: Vec<SendableRecordBatchStream>,
    ) -> Result<u64, EngineError> {
        let what = || format!("materializing `{name}`");
        let err = |e: DataFusionError| EngineError::query(what(), e);
        let dir = self.dir.path().join(name);
        let Some(schema) = streams.first().map(|s| s.schema()) else {
            return Err(err(DataFusionError::Internal(
                "a plan without partitions".into(),
            )));
        };
        let shared = Arc::new(Shared {
            budget: self.budget,
            held: AtomicUsize::new(0),
            spilled: AtomicBool::new(false),
        });
        let mut tasks = Vec::with_capacity(streams.len());
        for (index, stream) in streams.into_iter().enumerate() {
            let files = PartFiles {
                dir: dir.clone(),
                index,
            };
            // Each partition on its own task, so that the partitions' plans run on all workers.
            tasks.push(tokio::spawn(drain(stream, files, shared.clone())));
        }
        let mut parts = Vec::with_capacity(tasks.len());
        for task in tasks {
            parts.push(
                task.await
                    .map_err(|e| err(DataFusionError::External(Box::new(e))))?
                    .map_err(err)?,
            );
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        if shared.spilled.load(Ordering::SeqCst) {
            let schema = file_schema(&schema);
            // On disk in full: the partitions that finished within the budget join the others there.
            let mut files = Vec::with_capacity(parts.len());
            for part in parts {
                files.push(part.files.clone());
                part.into_files(&schema).map_err(err)?;
            }
            let table = ScratchTable { schema, files };
            ctx.register_table(name, Arc::new(table)).map_err(err)?;
        } else {
            let batches = parts.into_iter().map(|p| p.held).collect();
            let table = MemTable::try_new(schema, batches).map_err(err)?;
            ctx.register_table(name, Arc::new(table)).map_err(err)?;
        }
        Ok(rows)
    }

    /// The scratch directory (for tests and diagnostics).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Splits each of `streams` in two: the first of each pair passes every batch on; the second receives
/// the same rows with only the `columns` (by index; none keeps the row counts), as the first is read,
/// or with `only` (the index of a boolean column) only the rows where that column is true.
/// The copies go through a short queue, so the first stream waits while its copy is not read: both
/// sides must be read together. A copy ends when its original does, or ends early when it fails.
pub fn tee(
    streams: Vec<SendableRecordBatchStream>,
    columns: &[usize],
    only: Option<usize>,
) -> Result<
    (
        Vec<SendableRecordBatchStream>,
        Vec<SendableRecordBatchStream>,
    ),
    DataFusionError,
> {
    let mut originals = Vec::with_capacity(streams.len());
    let mut copies = Vec::with_capacity(streams.len());
    for stream in streams {
        let schema = stream.schema();
        let copy_schema = Arc::new(schema.project(columns)?);
        let (sender, receiver) = tokio::sync::mpsc::channel::<RecordBatch>(4);
        let columns = columns.to_vec();
        let passed = stream.then(move |batch| {
            let sender = sender.clone();
            let columns = columns.clone();
            async move {
                let batch = batch?;
                let mut copy = batch.project(&columns)?;
                if let Some(index) = only {
                    let mask = batch.column(index).as_boolean_opt().ok_or_else(|| {
                        DataFusionError::Internal(format!(
                            "column {index} of a copy's filter is not a boolean"
                        ))
                    })?;
                    copy = filter_record_batch(&copy, mask)?;
                }
                // A copy nobody reads any more (its reader failed) is no reason to stop the original.
                if copy.num_rows() > 0 {
                    let _ = sender.send(copy).await;
                }
                Ok(batch)
            }
        });
        originals.push(Box::pin(RecordBatchStreamAdapter::new(schema, passed)) as _);
        let received = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|batch| (Ok(batch), receiver))
        });
        copies.push(Box::pin(RecordBatchStreamAdapter::new(copy_schema, received)) as _);
    }
    Ok((originals, copies))
}

/// Removes the scratch directories under `parent` whose process is gone. Only where `/proc` tells
/// which processes live (Linux); best effort, as a directory left behind costs only disk.
fn remove_orphans(parent: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Where one partition of a result goes on disk: a file per column, `part-<index>-col-<column>.arrow`,
/// written in step (batch k of every file holds the same rows).
#[derive(Debug, Clone)]
struct PartFiles {
    dir: PathBuf,
    index: usize,
}

impl PartFiles {
    fn column(&self, column: usize) -> PathBuf {
        self.dir
            .join(format!("part-{}-col-{column}.arrow", self.index))
    }
}

/// A result on disk, as a table whose scans read only the columns they project.
#[derive(Debug)]
struct ScratchTable {
    schema: SchemaRef,
    files: Vec<PartFiles>,
}

#[async_trait::async_trait]
impl TableProvider for ScratchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let columns: Vec<usize> = match projection {
            Some(columns) => columns.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&columns)?);
        let partitions = self
            .files
            .iter()
            .map(|files| {
                Arc::new(ScratchPartition {
                    files: files.clone(),
                    schema: schema.clone(),
                    columns: columns.clone(),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            partitions,
            None,
            Vec::<LexOrdering>::new(),
            false,
            limit,
        )?))
    }
}

/// One partition of a [`ScratchTable`] scan, read batch by batch (DataFusion's own Arrow file reader
/// loads each file range whole, which for a large result means the result in memory again). The reads
/// are of local files just written (mostly from the page cache), made in place.
#[derive(Debug)]
struct ScratchPartition {
    files: PartFiles,
    /// The projected schema.
    schema: SchemaRef,
    /// The columns read, by their index in the result; none for a scan that only counts rows.
    columns: Vec<usize>,
}

impl PartitionStream for ScratchPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _context: Arc<TaskContext>) -> SendableRecordBatchStream {
        // A scan without columns reads the first column's file for the row counts.
        let read = if self.columns.is_empty() {
            vec![0]
        } else {
            self.columns.clone()
        };
        let opened = read
            .iter()
            .map(|&column| MappedFile::open(&self.files.column(column)))
            .collect::<Result<Vec<_>, DataFusionError>>();
        let batches = match opened {
            Ok(readers) => futures::stream::iter(InStep {
                readers,
                schema: self.schema.clone(),
                counting: self.columns.is_empty(),
            })
            .boxed(),
            Err(error) => futures::stream::once(async move { Err(error) }).boxed(),
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), batches))
    }
}

/// Bytes of a scratch file mapped at a time: the batches within one mapping share it, and it is
/// released when the last of them is dropped. Larger means fewer mappings (each unmapping stops every
/// thread of the process for a moment); smaller, fewer pages of batches already read held in memory.
const MAPPED_BYTES: usize = 4 << 20;

/// One column file of a result, read in place: its batches are mapped into memory a few MiB at a time,
/// so that their bytes are neither copied out of the page cache nor validated again.
struct MappedFile {
    path: PathBuf,
    file: File,
    length: usize,
    decoder: FileDecoder,
    blocks: Vec<Block>,
    next: usize,
    /// The mapping being read, and the file offset it starts at.
    mapped: Option<(usize, Buffer)>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<MappedFile, DataFusionError> {
        use datafusion::arrow::ipc::{
            convert::fb_to_schema, reader::read_footer_length, root_as_footer,
        };
        let invalid = |message: String| {
            DataFusionError::Internal(format!("scratch file {}: {message}", path.display()))
        };
        let file = File::open(path).map_err(|e| invalid(e.to_string()))?;
        let whole = map(&file, 0, None).map_err(|e| invalid(e.to_string()))?;
        let length = whole.len();
        let trailer_start = length
            .checked_sub(10)
            .ok_or_else(|| invalid("shorter than an IPC file's trailer".into()))?;
        let trailer: &[u8; 10] = whole[trailer_start..]
            .try_into()
            .map_err(|_| invalid("no trailer".into()))?;
        let footer_len = read_footer_length(*trailer).map_err(|e| invalid(e.to_string()))?;
        let footer_start = trailer_start
            .checked_sub(footer_len)
            .ok_or_else(|| invalid("footer longer than the file".into()))?;
        let footer = root_as_footer(&whole[footer_start..trailer_start])
            .map_err(|e| invalid(e.to_string()))?;
        let schema = footer
            .schema()
            .ok_or_else(|| invalid("no schema in the footer".into()))?;
        let decoder = FileDecoder::new(Arc::new(fb_to_schema(schema)), footer.version());
        // SAFETY: the bytes are those the IPC writer wrote from valid arrays in this process (see
        // `map`); validating them again (UTF-8 of every string) is what reading them in place saves.
        let decoder = unsafe { decoder.with_skip_validation(true) };
        // Scratch files hold no dictionaries (`file_schema`).
        let blocks = footer
            .recordBatches()
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        Ok(MappedFile {
            path: path.to_path_buf(),
            file,
            length,
            decoder,
            blocks,
            next: 0,
            mapped: None,
        })
    }

    /// Where block `index` lies in the file: offset and length.
    fn extent(&self, index: usize) -> Result<(usize, usize), String> {
        let block = self.blocks.get(index).ok_or("no such batch")?;
        let offset = usize::try_from(block.offset()).ok();
        let length = usize::try_from(block.bodyLength())
            .ok()
            .zip(usize::try_from(block.metaDataLength()).ok())
            .map(|(body, meta)| body + meta);
        offset
            .zip(length)
            .filter(|(o, l)| o.checked_add(*l).is_some_and(|end| end <= self.length))
            .ok_or_else(|| "a batch lies outside the file".to_string())
    }

    /// Reads block `index`, mapping it with the blocks after it unless the current mapping holds it.
    fn read(&mut self, index: usize) -> Result<Option<RecordBatch>, String> {
        let (offset, length) = self.extent(index)?;
        let held = |(start, buffer): &(usize, Buffer)| {
            offset >= *start && offset + length <= start + buffer.len()
        };
        if !self.mapped.as_ref().is_some_and(held) {
            let mut end = offset + length;
            for next in index + 1..self.blocks.len() {
                let (o, l) = self.extent(next)?;
                if o < end || o + l - offset > MAPPED_BYTES {
                    break;
                }
                end = o + l;
            }
            let map = map(&self.file, offset, Some(end - offset)).map_err(|e| e.to_string())?;
            self.mapped = Some((offset, Buffer::from(bytes::Bytes::from_owner(map))));
        }
        let Some((start, buffer)) = &self.mapped else {
            return Err("no mapping".into());
        };
        let data = buffer.slice_with_length(offset - start, length);
        self.decoder
            .read_record_batch(&self.blocks[index], &data)
            .map_err(|e| e.to_string())
    }
}

/// Maps `length` bytes of a scratch file from `offset` (to its end without a length).
fn map(file: &File, offset: usize, length: Option<usize>) -> std::io::Result<memmap2::Mmap> {
    let mut options = memmap2::MmapOptions::new();
    options.offset(offset as u64);
    if let Some(length) = length {
        options.len(length);
    }
    // SAFETY: a scratch file is written in full by this process before any read (`into_files` finishes
    // every writer before the result is registered), in a directory only this process uses, and it is
    // neither changed nor truncated until the scratch is dropped, which ends every read of it: the
    // mapping stays valid and its contents constant for as long as it lives.
    unsafe { options.map(file) }
}

impl Iterator for MappedFile {
    type Item = Result<RecordBatch, DataFusionError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.blocks.len() {
            self.next += 1;
            match self.read(self.next - 1) {
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => continue,
                Err(message) => {
                    return Some(Err(DataFusionError::Internal(format!(
                        "scratch file {}: {message}",
                        self.path.display()
                    ))));
                }
            }
        }
        None
    }
}

/// The column files of one partition read together, each batch made of the k-th batch of every file.
struct InStep {
    readers: Vec<MappedFile>,
    schema: SchemaRef,
    /// Batches with the rows' count and no columns.
    counting: bool,
}

impl Iterator for InStep {
    type Item = Result<RecordBatch, DataFusionError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut columns = Vec::with_capacity(self.readers.len());
        for reader in &mut self.readers {
            match reader.next() {
                Some(Ok(batch)) => columns.push(batch.column(0).clone()),
                Some(Err(error)) => return Some(Err(error)),
                None => break,
            }
        }
        if columns.is_empty() {
            return None;
        }
        if columns.len() != self.readers.len() {
            return Some(Err(DataFusionError::Internal(
                "the column files of a scratch result hold different numbers of batches".into(),
            )));
        }
        let rows = columns[0].len();
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        // A column stored as runs is expanded to the table's type.
        for (column, field) in columns.iter_mut().zip(self.schema.fields()) {
            if column.data_type() != field.data_type() {
                match expand_runs(column, field.data_type()) {
                    Ok(expanded) => *column = expanded,
                    Err(error) => return Some(Err(error.into())),
                }
            }
        }
        if self.counting {
            columns.clear();
        }
        Some(
            RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)
                .map_err(DataFusionError::from),
        )
    }
}

/// What the partitions of one result share: the bytes they hold in memory, and whether they went to disk.
struct Shared {
    budget: usize,
    held: AtomicUsize,
    spilled: AtomicBool,
}

/// One partition of a result: in memory (`held`), or in its files (`writers`, one per column, open
/// until [`Part::into_files`]).
struct Part {
    rows: u64,
    held: Vec<RecordBatch>,
    files: PartFiles,
    writers: Vec<FileWriter<BufWriter<PieceWriter<File>>>>,
    /// The schema of each column's file, as its writer was opened with ([`run_encoded`]).
    file_schemas: Vec<SchemaRef>,
}

impl Part {
    /// Moves what is held in memory to the files, which stay open for more. `next` is the batch about
    /// to be written, if any: with the held batches, the first of them decides how each column is stored.
    fn spill(
        &mut self,
        schema: &SchemaRef,
        next: Option<&RecordBatch>,
    ) -> Result<(), DataFusionError> {
        if self.writers.is_empty() {
            std::fs::create_dir_all(&self.files.dir)?;
            let schema = file_schema(schema);
            let sample = match self.held.first().or(next) {
                Some(batch) => Some(compact(batch)?),
                None => None,
            };
            for (column, field) in schema.fields().iter().enumerate() {
                let file = File::create(self.files.column(column))?;
                let stored = match &sample {
                    Some(sample) if has_runs(sample.column(column)) => run_encoded(field),
                    _ => field.as_ref().clone(),
                };
                let single = Arc::new(Schema::new_with_metadata(
                    vec![stored],
                    schema.metadata().clone(),
                ));
                self.writers.push(FileWriter::try_new(
                    BufWriter::new(PieceWriter(file)),
                    &single,
                )?);
                self.file_schemas.push(single);
            }
        }
        let held: Vec<RecordBatch> = self.held.drain(..).collect();
        for batch in held {
            self.write(&batch)?;
        }
        Ok(())
    }

    /// Writes each column of `batch` to its file.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), DataFusionError> {
        use datafusion::arrow::compute::cast;
        let batch = compact(batch)?;
        for ((writer, column), single) in self
            .writers
            .iter_mut()
            .zip(batch.columns())
            .zip(&self.file_schemas)
        {
            let stored = single.field(0).data_type();
            let column = if column.data_type() == stored {
                column.clone()
            } else {
                cast(column, stored)?
            };
            writer.write(&RecordBatch::try_new(single.clone(), vec![column])?)?;
        }
        Ok(())
    }

    /// Writes the partition to its files in full and closes them.
    fn into_files(mut self, schema: &SchemaRef) -> Result<(), DataFusionError> {
        self.spill(schema, None)?;
        for writer in &mut self.writers {
            writer.finish()?;
        }
        Ok(())
    }
}

/// In a column stored as runs, at most one value in this many starts a new run.
const VALUES_PER_RUN: usize = 16;

/// Whether a string or binary column is worth storing as runs of equal values: lineage columns (the file
/// a row came from, its order), an op column of a full load, any column of a result sorted by it. The
/// reference Silver load's file name and file order took 563 of its 1,885 MiB of scratch at 10M rows,
/// written into the page cache and read back, to hold 10 distinct values in long runs.
fn has_runs(column: &ArrayRef) -> bool {
    use datafusion::arrow::datatypes::DataType;
    let rows = column.len();
    matches!(
        column.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary
    ) && rows >= VALUES_PER_RUN
        && datafusion::arrow::compute::partition(std::slice::from_ref(column))
            .is_ok_and(|runs| runs.len() * VALUES_PER_RUN <= rows)
}

/// `column`, stored as runs ([`run_encoded`]), expanded to `data_type`. Strings are copied run by run into
/// a builder sized for them; arrow's cast first writes the index of every row's run and then takes
/// through it (1.3% of the 10M-row ingest's CPU for that index alone). Other types go through the cast.
fn expand_runs(
    column: &ArrayRef,
    data_type: &datafusion::arrow::datatypes::DataType,
) -> Result<ArrayRef, datafusion::arrow::error::ArrowError> {
    use datafusion::arrow::{
        array::{Array, AsArray, RunArray, StringBuilder},
        datatypes::{DataType, Int32Type},
    };
    let runs = column.as_any().downcast_ref::<RunArray<Int32Type>>();
    let values = runs.and_then(|runs| runs.values().as_string_opt::<i32>());
    let (Some(runs), Some(values), DataType::Utf8) = (runs, values, data_type) else {
        return datafusion::arrow::compute::cast(column, data_type);
    };
    // The rows of each run within the array's window (a slice of a run array keeps all its runs).
    let (first, end) = (runs.offset(), runs.offset() + runs.len());
    let mut start = 0;
    let spans = runs
        .run_ends()
        .values()
        .iter()
        .enumerate()
        .filter_map(|(run, &run_end)| {
            let run_end = usize::try_from(run_end).unwrap_or(0).min(end);
            let span = (run, start.max(first), run_end);
            start = start.max(run_end);
            (span.1 < span.2).then_some(span)
        });
    let spans: Vec<(usize, usize, usize)> = spans.collect();
    let bytes = spans
        .iter()
        .filter(|&&(run, _, _)| values.is_valid(run))
        .map(|&(run, from, to)| values.value(run).len() * (to - from))
        .sum::<usize>();
    if i32::try_from(bytes).is_err() {
        // More than a string array's 32-bit offsets reach: the cast reports it as an error.
        return datafusion::arrow::compute::cast(column, data_type);
    }
    let mut out = StringBuilder::with_capacity(runs.len(), bytes);
    for (run, from, to) in spans {
        if values.is_valid(run) {
            let value = values.value(run);
            (from..to).for_each(|_| out.append_value(value));
        } else {
            out.append_nulls(to - from);
        }
    }
    Ok(Arc::new(out.finish()))
}

/// `field` stored as runs: each run's last row (32-bit) and its value. Read back, the column is
/// expanded to `field`'s type again ([`InStep`]).
fn run_encoded(field: &datafusion::arrow::datatypes::Field) -> datafusion::arrow::datatypes::Field {
    use datafusion::arrow::datatypes::{DataType, Field};
    let runs = DataType::RunEndEncoded(
        Arc::new(Field::new("run_ends", DataType::Int32, false)),
        Arc::new(Field::new("values", field.data_type().clone(), true)),
    );
    field.clone().with_data_type(runs)
}

/// `schema` as its scratch files hold it ([`stored_type`]).
fn file_schema(schema: &SchemaRef) -> SchemaRef {
    use datafusion::arrow::datatypes::{Field, Schema};
    if schema
        .fields()
        .iter()
        .all(|f| stored_type(f.data_type()).is_none())
    {
        return schema.clone();
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match stored_type(f.data_type()) {
            Some(stored) => f.as_ref().clone().with_data_type(stored),
            None => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// The type a scratch file holds a column of type `data_type` as, when not that type: a dictionary as
/// its values (an IPC file holds one dictionary per column, and each batch of a result can bring its own:
/// delta-rs's file and partition columns do), and string and binary views as plain strings and bytes.
/// A view takes 16 bytes per value before its bytes: the reference Silver batch's short strings (a state,
/// a channel, an op) took 2.5 GB of scratch at 10M rows, about a third more than as plain strings, all of
/// it copied into the page cache and freed again.
fn stored_type(
    data_type: &datafusion::arrow::datatypes::DataType,
) -> Option<datafusion::arrow::datatypes::DataType> {
    use datafusion::arrow::datatypes::DataType;
    match data_type {
        DataType::Dictionary(_, values) => {
            Some(stored_type(values).unwrap_or_else(|| values.as_ref().clone()))
        }
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    }
}

/// `batch` as its scratch file holds it ([`file_schema`]): cast columns hold only their own bytes.
fn compact(batch: &RecordBatch) -> Result<RecordBatch, DataFusionError> {
    use datafusion::arrow::compute::cast;
    let schema = file_schema(&batch.schema());
    if Arc::ptr_eq(&schema, &batch.schema()) {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| -> Result<ArrayRef, DataFusionError> {
            Ok(if column.data_type() == field.data_type() {
                column.clone()
            } else {
                cast(column, field.data_type())?
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `batch` with its string and binary views holding only their own bytes. A view array made by a
/// slice, a filter or a join's take shares its parent's data buffers: the IPC writer writes them whole
/// (written as they came, a 3M-row join result took 22 GB of scratch instead of 0.8 GB), and held in
/// memory they keep the parent alive and count as its size, so that a result of a few MB (the 56k
/// changes a full load's latest changes supersede) looked like hundreds to the budget and to the join
/// planner, which then repartitioned the other side instead of hashing this one.
fn own_bytes(batch: &RecordBatch) -> Result<RecordBatch, DataFusionError> {
    use datafusion::arrow::{array::AsArray, datatypes::DataType};
    let views = |t: &DataType| matches!(t, DataType::Utf8View | DataType::BinaryView);
    if !batch.schema().fields().iter().any(|f| views(f.data_type())) {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .map(|column| -> ArrayRef {
            match column.data_type() {
                DataType::Utf8View => Arc::new(column.as_string_view().gc()),
                DataType::BinaryView => Arc::new(column.as_binary_view().gc()),
                _ => column.clone(),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// Reads one partition's stream, holding its batches in memory while the result fits the budget, and
/// writing them to `file` from the moment any partition finds that it does not. The writes are buffered
/// writes to local disk, short enough to make on the runtime's worker.
async fn drain(
    mut stream: SendableRecordBatchStream,
    files: PartFiles,
    shared: Arc<Shared>,
) -> Result<Part, DataFusionError> {
    let schema = stream.schema();
    let mut part = Part {
        rows: 0,
        held: Vec::new(),
        files,
        writers: Vec::new(),
        file_schemas: Vec::new(),
    };
    // A result without columns has nothing to write: it stays in memory (its batches are row counts).
    let in_memory = schema.fields().is_empty();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        part.rows += batch.num_rows() as u64;
        if in_memory {
            part.held.push(batch);
            continue;
        }
        if part.writers.is_empty() && !shared.spilled.load(Ordering::SeqCst) {
            let batch = own_bytes(&batch)?;
            let size = batch.get_array_memory_size();
            let held = shared.held.fetch_add(size, Ordering::SeqCst) + size;
            if held <= shared.budget {
                part.held.push(batch);
                continue;
            }
            shared.spilled.store(true, Ordering::SeqCst);
        }
        part.spill(&schema, Some(&batch))?;
        part.write(&batch)?;
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;

    /// The first value of `sql`'s result, a BIGINT.
    async fn first_int(ctx: &SessionContext, sql: &str) -> i64 {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        batches[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0)
    }

    /// Tees 100,000 rows of `a`, `b = 2a`, `c` (text) and `d` (whether `a` is a multiple of 3),
    /// copying `b` (where `only` is true, with `only`), and reads both sides: the rows passed on, the
    /// rows copied, the sum of `b` over the copy and the copy's columns.
    async fn tee_sum(only: Option<usize>) -> (usize, u64, i64, Vec<String>) {
        let ctx = SessionContext::new();
        let frame = ctx
            .sql(
                "SELECT v AS a, v * 2 AS b, CAST(v AS VARCHAR) AS c, v % 3 = 0 AS d \
                  FROM generate_series(1, 100000) AS t(v)",
            )
            .await
            .unwrap()
            .repartition(datafusion::logical_expr::Partitioning::RoundRobinBatch(2))
            .unwrap();
        let streams = frame.execute_stream_partitioned().await.unwrap();
        let (originals, copies) = tee(streams, &[1], only).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        let read_all = async {
            let mut rows = 0;
            for mut stream in originals {
                while let Some(batch) = stream.next().await {
                    let batch = batch.unwrap();
                    assert_eq!(batch.num_columns(), 4);
                    rows += batch.num_rows();
                }
            }
            rows
        };
        // Both sides are read together, or the first waits on its full queue.
        let (rows, copied) =
            tokio::join!(read_all, scratch.materialize_streams(&ctx, "copy", copies));
        let sum = first_int(&ctx, "SELECT COALESCE(SUM(b), 0) FROM copy").await;
        let schema = ctx.table("copy").await.unwrap().schema().as_arrow().clone();
        let names = schema.fields().iter().map(|f| f.name().clone()).collect();
        (rows, copied.unwrap(), sum, names)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tee_passes_every_row_on_and_copies_the_columns_asked_for() {
        assert_eq!(
            tee_sum(None).await,
            (100_000, 100_000, 100_000 * 100_001, vec!["b".to_string()])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_filtered_tee_passes_every_row_on_and_copies_only_the_rows_asked_for() {
        // The multiples of 3 up to 99,999: 33,333 of them, summing to 3 * (33,333 * 33,334 / 2).
        let sum_of_multiples = 3 * 33_333 * 33_334 / 2;
        assert_eq!(
            tee_sum(Some(3)).await,
            (100_000, 33_333, 2 * sum_of_multiples, vec!["b".to_string()])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_within_the_budget_is_read_back_unchanged() {
        round_trip(Scratch::new(None).unwrap(), false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_over_the_budget_goes_to_disk_and_is_read_back_unchanged() {
        let parent = tempfile::tempdir().unwrap();
        round_trip(Scratch::new_in(parent.path(), 4096).unwrap(), true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slices_of_one_string_view_array_are_written_with_only_their_own_bytes() {
        use datafusion::arrow::{
            array::StringViewArray,
            datatypes::{DataType, Field, Schema},
        };
        let values: StringViewArray = (0..100_000)
            .map(|i| Some(format!("a string longer than twelve bytes, number {i:08}")))
            .collect();
        let bytes: usize = values.data_buffers().iter().map(|b| b.len()).sum();
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8View, true)]));
        let whole = RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap();
        // A hundred slices, each sharing all of the array's data buffers.
        let slices: Vec<RecordBatch> = (0..100).map(|i| whole.slice(i * 1000, 1000)).collect();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![slices]).unwrap();
        let frame = ctx.read_table(Arc::new(table)).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert_eq!(
            scratch.materialize(&ctx, "t", frame).await.unwrap(),
            100_000
        );
        let written: u64 = std::fs::read_dir(scratch.path().join("t"))
            .unwrap()
            .map(|f| f.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            written < 2 * bytes as u64,
            "{written} bytes written for {bytes} bytes of strings"
        );
        assert_eq!(
            first_int(&ctx, "SELECT COUNT(DISTINCT s) FROM t").await,
            100_000
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dictionary_columns_with_a_dictionary_per_batch_go_to_disk_as_their_values() {
        use datafusion::arrow::{
            array::{DictionaryArray, Int64Array},
            datatypes::{DataType, Field, Int16Type, Schema},
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new(
                "file",
                DataType::Dictionary(Box::new(DataType::Int16), Box::new(DataType::Utf8)),
                true,
            ),
        ]));
        // Each batch with its own dictionary, as a Delta scan's file column comes.
        let batches: Vec<RecordBatch> = (0..10)
            .map(|b| {
                let names: Vec<Option<String>> = (0..100)
                    .map(|i| (i % 7 != 0).then(|| format!("part-{b}-{}.parquet", i % 3)))
                    .collect();
                let files: DictionaryArray<Int16Type> =
                    names.iter().map(|n| n.as_deref()).collect();
                let numbers = Int64Array::from_iter_values(0..100);
                RecordBatch::try_new(schema.clone(), vec![Arc::new(numbers), Arc::new(files)])
                    .unwrap()
            })
            .collect();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![batches]).unwrap();
        let frame = ctx.read_table(Arc::new(table)).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert_eq!(scratch.materialize(&ctx, "t", frame).await.unwrap(), 1_000);
        let counted = ctx
            .sql("SELECT COUNT(file), COUNT(DISTINCT file) FROM t WHERE file LIKE 'part-3-%'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let count = |c: usize| {
            counted[0]
                .column(c)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0)
        };
        assert_eq!((count(0), count(1)), (85, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_reads_the_files_of_the_columns_it_names_and_no_other() {
        let ctx = SessionContext::new();
        let frame = ctx
            .sql(
                "SELECT v AS id, CAST(v AS VARCHAR) AS label, v * 2 AS twice \
                 FROM generate_series(1, 50000) AS t(v)",
            )
            .await
            .unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert_eq!(scratch.materialize(&ctx, "t", frame).await.unwrap(), 50_000);
        // Without the label's files, queries that do not name it still read the result.
        let mut removed = 0;
        for file in std::fs::read_dir(scratch.path().join("t")).unwrap() {
            let path = file.unwrap().path();
            if path.to_string_lossy().ends_with("-col-1.arrow") {
                std::fs::remove_file(path).unwrap();
                removed += 1;
            }
        }
        assert!(removed > 0, "no file of the second column");
        let int = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await?.collect().await?;
                Ok::<i64, DataFusionError>(
                    batches[0]
                        .column(0)
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                        .value(0),
                )
            }
        };
        assert_eq!(int("SELECT COUNT(*) FROM t").await.unwrap(), 50_000);
        assert_eq!(
            int("SELECT SUM(twice - id) FROM t WHERE id > 25000")
                .await
                .unwrap(),
            (25_001..=50_000).sum::<i64>()
        );
        assert!(int("SELECT COUNT(label) FROM t").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scratch_file_cut_short_or_overwritten_is_an_error_not_a_crash() {
        let ctx = SessionContext::new();
        let frame = ctx
            .sql("SELECT v AS id, CAST(v AS VARCHAR) AS label FROM generate_series(1, 20000) AS t(v)")
            .await
            .unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert_eq!(scratch.materialize(&ctx, "t", frame).await.unwrap(), 20_000);
        let files: Vec<PathBuf> = std::fs::read_dir(scratch.path().join("t"))
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        let of = |column: &str| {
            files
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(column))
                .cloned()
                .collect::<Vec<_>>()
        };
        // The labels cut in half (no footer left); the ids' footer overwritten.
        for path in of("-col-1.arrow") {
            let length = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(length / 2)
                .unwrap();
        }
        for path in of("-col-0.arrow") {
            let mut bytes = std::fs::read(&path).unwrap();
            let end = bytes.len();
            bytes[end - 200..end - 10].fill(0xff);
            std::fs::write(&path, bytes).unwrap();
        }
        let read = |sql: &'static str| {
            let ctx = ctx.clone();
            async move { ctx.sql(sql).await?.collect().await }
        };
        let error = read("SELECT MAX(label) FROM t")
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("scratch file"), "{error}");
        assert!(read("SELECT SUM(id) FROM t").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_result_sharing_a_large_ones_buffers_counts_and_holds_only_its_own_bytes() {
        use datafusion::arrow::{
            array::{Int64Array, StringViewArray},
            datatypes::{DataType, Field, Schema},
        };
        let ctx = crate::delta::session(None).unwrap();
        // 1,000 rows sliced out of a million strings of ~40 bytes (as a join's or a sort's output
        // shares its input's buffers, or a read of a scratch file its mapping): as they come, they
        // keep and count the million's 40 MB, over the 8 MiB budget.
        let labels: StringViewArray = (0..1_000_000)
            .map(|i| Some(format!("a string longer than a view holds {i}")))
            .collect();
        let keys = Int64Array::from_iter_values(0..1_000_000);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("label", DataType::Utf8View, true),
        ]));
        let sliced = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(keys.slice(0, 1_000)),
                Arc::new(labels.slice(0, 1_000)),
            ],
        )
        .unwrap();
        assert!(sliced.get_array_memory_size() > 8 << 20);
        let source = MemTable::try_new(schema, vec![vec![sliced]]).unwrap();
        ctx.register_table("source", Arc::new(source)).unwrap();
        let frame = ctx.table("source").await.unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 8 << 20).unwrap();
        assert_eq!(
            scratch.materialize(&ctx, "small", frame).await.unwrap(),
            1_000
        );
        assert!(
            !scratch.path().join("small").exists(),
            "the result went to disk"
        );
        // Known to be small, it is the side of a join that is hashed once (its million-string parent
        // counted, it was over the 10 MiB up to which a side is).
        crate::delta::assert_hashed_once(&ctx, "small").await;
        assert_eq!(
            first_int(&ctx, "SELECT COUNT(DISTINCT label) FROM small").await,
            1_000
        );
    }

    #[test]
    fn the_directories_of_ended_processes_are_removed_and_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        // Linux pids stay below 2^22: this one never lives.
        let orphan = parent.path().join("medallion-999999999-abc");
        let live = parent
            .path()
            .join(format!("medallion-{}-xyz", std::process::id()));
        let other = parent.path().join("medallion-notes");
        for dir in [&orphan, &live, &other] {
            std::fs::create_dir_all(dir.join("t")).unwrap();
        }
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert!(!orphan.exists(), "an ended process's scratch was kept");
        assert!(live.exists() && other.exists());
        assert!(scratch.path().starts_with(parent.path()));
    }

    async fn round_trip(scratch: Scratch, on_disk: bool) {
        let ctx = SessionContext::new();
        let frame = ctx
            .sql(
                "SELECT v AS id, CAST(v AS DECIMAL(18,2)) AS amount, \
                 CASE WHEN v % 3 = 0 THEN NULL ELSE CAST(v AS VARCHAR) END AS label \
                 FROM generate_series(1, 10000) AS t(v)",
            )
            .await
            .unwrap();
        let planned = frame.schema().as_arrow().clone();
        assert_eq!(scratch.materialize(&ctx, "t", frame).await.unwrap(), 10_000);
        let table = ctx.table("t").await.unwrap();
        assert_eq!(
            table.schema().as_arrow().fields().len(),
            planned.fields().len()
        );
        let sums = ctx
            .sql("SELECT COUNT(*), SUM(amount), COUNT(label), SUM(id) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let row = &sums[0];
        assert_eq!(
            row.column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            10_000
        );
        let amount =
            datafusion::arrow::util::display::array_value_to_string(row.column(1), 0).unwrap();
        assert_eq!(amount, "50005000.00");
        assert_eq!(
            row.column(2)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            6_667
        );
        let dir = scratch.path().to_path_buf();
        assert_eq!(dir.join("t").is_dir(), on_disk);
        drop(scratch);
        assert!(!dir.exists(), "the scratch directory outlived its owner");
    }

    #[test]
    fn runs_expand_like_arrows_cast_also_sliced_and_with_null_runs() {
        use datafusion::arrow::{
            array::{Array, BinaryArray, Int32Array, RunArray, StringArray},
            compute::cast,
            datatypes::{DataType, Int32Type},
        };
        let values = StringArray::from(vec![
            Some("s3://landing/LOAD1.csv"),
            None,
            Some(""),
            Some("b"),
        ]);
        let runs =
            RunArray::<Int32Type>::try_new(&Int32Array::from(vec![3, 5, 6, 10]), &values).unwrap();
        let whole: ArrayRef = Arc::new(runs);
        // Slices starting inside a run, ending inside another, inside a single run, and empty.
        for (offset, len) in [(0, 10), (1, 7), (3, 2), (4, 1), (7, 3), (10, 0)] {
            let column = whole.slice(offset, len);
            let expanded = expand_runs(&column, &DataType::Utf8).unwrap();
            let expected = cast(&column, &DataType::Utf8).unwrap();
            assert_eq!(&expanded, &expected, "slice {offset}+{len}");
            assert_eq!(expanded.null_count(), expected.null_count());
        }
        // Bytes are not taken by the fast path, and still expand.
        let bytes = BinaryArray::from(vec![Some(b"ab".as_slice()), None]);
        let runs: ArrayRef = Arc::new(
            RunArray::<Int32Type>::try_new(&Int32Array::from(vec![2, 3]), &bytes).unwrap(),
        );
        let expanded = expand_runs(&runs, &DataType::Binary).unwrap();
        assert_eq!(expanded.len(), 3);
        assert_eq!(expanded.null_count(), 1);
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn columns_of_long_runs_go_to_disk_as_runs_and_read_back_the_same() {
        use datafusion::arrow::{
            array::{Array, AsArray, Int64Array, StringArray},
            datatypes::{DataType, Field, Schema},
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("file", DataType::Utf8, true),
            Field::new("label", DataType::Utf8, true),
        ]));
        // `file` holds long runs (NULL among them) in the first batches, then a new value on every row:
        // stored as runs from the first batch, it must still read back every value of the last ones.
        let batches: Vec<RecordBatch> = (0..20)
            .map(|b| {
                let rows = b * 10_000..(b + 1) * 10_000;
                let files: StringArray = rows
                    .clone()
                    .map(|i| match (b, i / 2_500 % 4) {
                        (19, _) => Some(format!("row-{i}")),
                        (_, 3) => None,
                        (_, run) => Some(format!(
                            "s3://landing/public/transactions/LOAD{b:04}{run}.csv"
                        )),
                    })
                    .collect();
                let labels: StringArray =
                    rows.clone().map(|i| Some(format!("label-{i}"))).collect();
                let numbers = Int64Array::from_iter_values(rows.map(|i| i as i64));
                RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(numbers), Arc::new(files), Arc::new(labels)],
                )
                .unwrap()
            })
            .collect();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![batches.clone()]).unwrap();
        let frame = ctx.read_table(Arc::new(table)).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::new_in(parent.path(), 0).unwrap();
        assert_eq!(
            scratch.materialize(&ctx, "t", frame).await.unwrap(),
            200_000
        );
        let size = |column: usize| -> u64 {
            std::fs::read_dir(scratch.path().join("t"))
                .unwrap()
                .map(|f| f.unwrap().path())
                .filter(|p| {
                    p.to_string_lossy()
                        .ends_with(&format!("-col-{column}.arrow"))
                })
                .map(|p| p.metadata().unwrap().len())
                .sum()
        };
        // As strings, the file names of 190,000 rows alone take over 8 MB; as runs, their last batch's
        // 10,000 distinct values are most of what is left. The labels have no runs and stay strings.
        assert!(size(1) < 1_000_000, "{} bytes for the file column", size(1));
        assert!(size(2) > 2_000_000, "{} bytes for the labels", size(2));
        let read = ctx
            .sql("SELECT n, file, label FROM t ORDER BY n")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(read[0].schema().field(1).data_type(), &DataType::Utf8);
        let strings = |batches: &[RecordBatch], column: usize| -> Vec<Option<String>> {
            batches
                .iter()
                .flat_map(|b| {
                    let c = b.column(column).as_string::<i32>().clone();
                    (0..c.len())
                        .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        assert_eq!(strings(&read, 1), strings(&batches, 1));
        assert_eq!(strings(&read, 2), strings(&batches, 2));
        let nulls = ctx
            .sql("SELECT COUNT(*) - COUNT(file) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let nulls = nulls[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0);
        assert_eq!(nulls, 19 * 2_500);
    }
}
#[tokio::test]
async fn short_strings_go_to_disk_without_their_16_byte_views_and_read_back_the_same() {
    use datafusion::arrow::{
        array::{Array, AsArray, StringViewArray},
        datatypes::{DataType, Field, Schema},
    };
    let states = ["TX", "CA", "NY", "", "ONLINE"];
    let values: StringViewArray = (0..100_000)
        .map(|i| (i % 7 != 0).then(|| states[i % states.len()]))
        .collect();
    let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8View, true)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(values.clone())]).unwrap();
    let ctx = SessionContext::new();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    let frame = ctx.read_table(Arc::new(table)).unwrap();
    let parent = tempfile::tempdir().unwrap();
    let scratch = Scratch::new_in(parent.path(), 0).unwrap();
    scratch.materialize(&ctx, "t", frame).await.unwrap();
    let written: u64 = std::fs::read_dir(scratch.path().join("t"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    // As views: 16 bytes a value. As strings: a 4-byte offset and at most 6 bytes.
    assert!(
        written < 1_200_000,
        "{written} bytes for 100,000 short strings"
    );
    let read = ctx
        .sql("SELECT s FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let read: Vec<Option<String>> = read
        .iter()
        .flat_map(|b| {
            let column = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let strings = column.as_string::<i32>().clone();
            (0..strings.len())
                .map(|i| strings.is_valid(i).then(|| strings.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<Option<String>> = values.iter().map(|v| v.map(String::from)).collect();
    assert_eq!(read, expected);
}
