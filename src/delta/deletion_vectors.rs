//! Deletion vectors: a change batch applied to a table created with them
//! (`delta.enableDeletionVectors`) marks the rows it replaces or deletes in the files that hold them,
//! instead of rewriting those files. Each marked file keeps its path; its `add` gains a deletion
//! vector (the positions of its rows no longer live), written with the others of the batch into one
//! `deletion_vector_<uuid>.bin` beside the data, in the format of Delta's protocol. The new versions
//! of updated rows are written as new files with the inserts. A batch then costs the rows it changes
//! and a read of the key column of the files it touches, not a rewrite of those files.
//!
//! Readers must support the `deletionVectors` table feature: delta-rs (medallion itself, Polars,
//! Python `deltalake`'s `QueryBuilder`), DuckDB's `delta_scan`, Spark with Delta 2.3 or later. Python
//! `deltalake`'s `to_pyarrow_table` (1.6) refuses such a table.

use std::collections::{HashMap, HashSet};

use datafusion::arrow::{
    array::{Array, AsArray},
    datatypes::{DataType, Int64Type},
};
use deltalake::{
    DeltaTable,
    kernel::{Action, Add, DeletionVectorDescriptor, Remove, StorageType},
};
use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::DeltaError;
use crate::{engine::udf::repeated::KeySet, storage::Location};

/// The table property that turns deletion vectors on.
const PROPERTY: &str = "delta.enableDeletionVectors";

/// Whether a merge into `table` marks rows deleted rather than rewriting files: the table enables
/// deletion vectors and its protocol names the feature (a writer must not add them otherwise).
pub fn deletion_vectors_enabled(table: &DeltaTable) -> bool {
    let Ok(snapshot) = table.snapshot() else {
        return false;
    };
    let enabled = snapshot
        .metadata()
        .configuration()
        .get(PROPERTY)
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    let protocol = snapshot.protocol();
    let named = protocol
        .writer_features()
        .is_some_and(|features| features.iter().any(|f| f.as_ref() == "deletionVectors"));
    enabled && named
}

/// The actions that mark rows deleted, and the deletion-vector file they point into.
pub(super) struct Marked {
    /// A `remove` of each touched file, and an `add` of it with its new deletion vector unless no row
    /// of it is left.
    pub actions: Vec<Action>,
    /// The file holding the new deletion vectors (written; to delete if the batch's write fails).
    pub file: Option<deltalake::Path>,
    /// Files removed, no row of them left.
    pub removed: u64,
    /// Live rows newly marked deleted.
    pub rows: u64,
}

impl Marked {
    /// Deletes the deletion-vector file of a batch whose write failed before its commit (best
    /// effort: an unreferenced file is invisible to readers).
    pub async fn discard(&self, path: &Location, table: &DeltaTable) {
        let Some(file) = &self.file else { return };
        if let Err(error) = table.log_store().object_store(None).delete(file).await {
            tracing::warn!(table = %path, "could not remove the unpublished `{file}`: {error}");
        }
    }
}

/// The rows each file of `scan` keeps, by scan id, for the files with a deletion vector (the others
/// keep all): what [`mark`] and [`mark_where`] take as `kept`.
pub(super) async fn kept_rows(
    scan: &deltalake::delta_datafusion::DeltaScanNext,
    ctx: &datafusion::prelude::SessionContext,
) -> datafusion::error::Result<HashMap<String, Vec<bool>>> {
    Ok(scan
        .deletion_vectors(&ctx.state())
        .await?
        .into_iter()
        .map(|selection| (selection.filepath, selection.keep_mask))
        .collect())
}

/// Marks deleted, in the files of `table` whose scan ids are `files`, every row whose `key` is in
/// `changed` or that an earlier deletion vector already deletes. `kept` gives, per scan id, the rows
/// an earlier deletion vector keeps (files without one keep all). `expected` is how many live rows
/// the batch replaces or deletes: every one of them must be found, once, or nothing is written.
pub(super) async fn mark(
    path: &Location,
    table: &DeltaTable,
    files: &HashSet<String>,
    kept: &HashMap<String, Vec<bool>>,
    key: &str,
    changed: &KeySet,
    expected: u64,
) -> Result<Marked, DeltaError> {
    let gone = |key: i64| changed.contains(key);
    mark_where(path, table, Some(files), kept, key, &gone, Some(expected)).await
}

/// As [`mark`], for the rows whose `key` is `gone`, in the files `files` or (`None`) in every file;
/// with `expected`, exactly that many live rows must be found. A file none of whose live rows is
/// gone is left as it is.
pub(super) async fn mark_where(
    path: &Location,
    table: &DeltaTable,
    files: Option<&HashSet<String>>,
    kept: &HashMap<String, Vec<bool>>,
    key: &str,
    gone: &(dyn Fn(i64) -> bool + Sync),
    expected: Option<u64>,
) -> Result<Marked, DeltaError> {
    let invalid = |message: String| DeltaError::Invalid {
        table: path.to_string(),
        message,
    };
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let root = super::files::root_url(table);
    let store = table.log_store().object_store(None);
    // Each file's scan id, `add` and `remove` (both with any deletion vector) and row count, gathered
    // before any read.
    let mut touched = Vec::new();
    for view in snapshot.log_data() {
        let id = super::files::scan_id(path, &root, &view.path())?;
        if files.is_none_or(|files| files.contains(id.as_str())) {
            // delta-rs 1.1's way to a file's whole `add`, its vector included.
            #[allow(deprecated)]
            let add = view.add_action();
            let file = view.object_store_path();
            touched.push((
                id.to_string(),
                file,
                add,
                view.remove_action(true),
                view.num_records(),
            ));
        }
    }
    let mut checked = Vec::with_capacity(touched.len());
    for (id, file, add, remove, counted) in touched {
        let keep = kept.get(&id);
        // A vector the scan did not give would be dropped, and the rows it deletes come back.
        match (&add.deletion_vector, keep) {
            (Some(vector), Some(keep))
                if keep.iter().filter(|kept| !**kept).count() as i64 == vector.cardinality => {}
            (None, None) => {}
            _ => {
                return Err(invalid(format!(
                    "the deletion vector of `{}` was not read as its `add` describes it; nothing \
                     was written",
                    add.path
                )));
            }
        }
        checked.push((file, add, remove, counted, keep));
    }
    // The files' keys are read a few at a time: each read decodes one column on one core.
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut reads = Vec::with_capacity(checked.len());
    for (file, add, remove, counted, keep) in checked {
        reads.push(read_file(
            &store, file, add, remove, counted, key, gone, keep,
        ));
    }
    let read: Vec<_> = futures::stream::iter(reads)
        .buffered(parallel)
        .collect()
        .await;
    let files_found = read.len();
    let mut vectors = Vec::with_capacity(read.len());
    let mut found = 0u64;
    for (add, remove, counted, rows) in read {
        let rows =
            rows.map_err(|e| invalid(format!("cannot read the keys of `{}`: {e}", add.path)))?;
        if counted.is_some_and(|counted| counted as u64 != rows.rows) {
            return Err(invalid(format!(
                "`{}` holds {} rows, its statistics say {counted:?}; nothing was written",
                add.path, rows.rows
            )));
        }
        found += rows.newly;
        if rows.newly > 0 {
            vectors.push((add, remove, rows));
        }
    }
    if let Some(files) = files
        && files_found != files.len()
    {
        return Err(invalid(format!(
            "{} of the {} files holding changed rows are not in the table's version {:?}",
            files.len() - files_found,
            files.len(),
            table.version()
        )));
    }
    if let Some(expected) = expected
        && found != expected
    {
        return Err(invalid(format!(
            "the batch replaces or deletes {expected} live row(s), but {found} were found in the \
             files holding them; nothing was written"
        )));
    }
    let mut marked = write(path, table, vectors).await?;
    marked.rows = found;
    Ok(marked)
}

/// [`read_deleted`] of one file, with what its actions are made from.
#[allow(clippy::too_many_arguments)]
async fn read_file(
    store: &std::sync::Arc<dyn deltalake::ObjectStore>,
    file: deltalake::Path,
    add: Add,
    remove: Remove,
    counted: Option<usize>,
    key: &str,
    gone: &(dyn Fn(i64) -> bool + Sync),
    keep: Option<&Vec<bool>>,
) -> (Add, Remove, Option<usize>, Result<Deleted, String>) {
    let rows = read_deleted(store, &file, add.size, key, gone, keep).await;
    (add, remove, counted, rows)
}

/// The rows of one file to mark: every deleted position, how many of them are newly deleted, and
/// the rows the file holds.
struct Deleted {
    positions: Vec<u64>,
    newly: u64,
    rows: u64,
}

/// Reads the `key` column of the file at `file` (of `size` bytes) and gives the positions of its rows
/// that `keep` already deletes or whose key is `gone`.
async fn read_deleted(
    store: &std::sync::Arc<dyn deltalake::ObjectStore>,
    file: &deltalake::Path,
    size: i64,
    key: &str,
    gone: &(dyn Fn(i64) -> bool + Sync),
    keep: Option<&Vec<bool>>,
) -> Result<Deleted, String> {
    #[allow(deprecated)]
    // parquet 59 would have the I/O on a runtime of its own; one column here.
    use deltalake::parquet::arrow::async_reader::ParquetObjectReader;
    use deltalake::parquet::arrow::{
        ProjectionMask, async_reader::ParquetRecordBatchStreamBuilder,
    };
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(store.clone(), file.clone())
        .with_file_size(u64::try_from(size).map_err(|_| format!("a size of {size} bytes"))?);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| e.to_string())?;
    let column = builder
        .schema()
        .index_of(key)
        .map_err(|_| format!("no column `{key}`"))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [column]);
    let mut stream = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut deleted = Deleted {
        positions: Vec::new(),
        newly: 0,
        rows: 0,
    };
    let mut position = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| e.to_string())?;
        let keys = datafusion::arrow::compute::cast(batch.column(0), &DataType::Int64)
            .map_err(|e| e.to_string())?;
        let keys = keys.as_primitive::<Int64Type>();
        for row in 0..keys.len() {
            let at = position + row as u64;
            let was_deleted =
                keep.is_some_and(|keep| !keep.get(at as usize).copied().unwrap_or(true));
            if was_deleted {
                deleted.positions.push(at);
            } else if keys.is_valid(row) && gone(keys.value(row)) {
                deleted.positions.push(at);
                deleted.newly += 1;
            }
        }
        position += keys.len() as u64;
    }
    if let Some(keep) = keep
        && keep.len() as u64 != position
    {
        return Err(format!(
            "its deletion vector covers {} rows, the file holds {position}",
            keep.len()
        ));
    }
    deleted.rows = position;
    Ok(deleted)
}

/// Writes the deletion vectors of `vectors` into one new file of `table` and gives the actions that
/// point each file's `add` at its own.
async fn write(
    path: &Location,
    table: &DeltaTable,
    vectors: Vec<(Add, Remove, Deleted)>,
) -> Result<Marked, DeltaError> {
    use delta_kernel::actions::deletion_vector_writer::{
        KernelDeletionVector, StreamingDeletionVectorWriter,
    };
    let failed = |e: &dyn std::fmt::Display| DeltaError::Invalid {
        table: path.to_string(),
        message: format!("cannot write deletion vectors: {e}"),
    };
    let id = uuid::Uuid::new_v4();
    let mut bytes = Vec::new();
    let mut actions = Vec::with_capacity(2 * vectors.len());
    let mut removed = 0;
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        for (add, remove, deleted) in vectors {
            actions.push(Action::Remove(remove));
            if deleted.positions.len() as u64 >= deleted.rows {
                // No row of it is left: removed, not marked.
                removed += 1;
                continue;
            }
            let mut vector = KernelDeletionVector::new();
            vector.add_deleted_row_indexes(deleted.positions);
            let written = writer
                .write_deletion_vector(vector)
                .map_err(|e| failed(&e))?;
            actions.push(Action::Add(Add {
                deletion_vector: Some(DeletionVectorDescriptor {
                    storage_type: StorageType::UuidRelativePath,
                    path_or_inline_dv: z85::encode(id.as_bytes()),
                    offset: Some(written.offset),
                    size_in_bytes: written.size_in_bytes,
                    cardinality: written.cardinality,
                }),
                stats: add.stats.as_deref().map(loose_bounds),
                modification_time: chrono::Utc::now().timestamp_millis(),
                data_change: true,
                ..add
            }));
        }
        writer.finalize().map_err(|e| failed(&e))?;
    }
    if bytes.is_empty() {
        return Ok(Marked {
            actions,
            file: None,
            removed,
            rows: 0,
        });
    }
    let file = deltalake::Path::from(format!("deletion_vector_{id}.bin"));
    table
        .log_store()
        .object_store(None)
        .put(&file, bytes.into())
        .await
        .map_err(|e| failed(&e))?;
    Ok(Marked {
        actions,
        file: Some(file),
        removed,
        rows: 0,
    })
}

/// `stats` with `tightBounds` false: the least and greatest values may now belong to deleted rows
/// (Delta's protocol asks this of a file with a deletion vector).
fn loose_bounds(stats: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(stats) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.insert("tightBounds".into(), serde_json::Value::Bool(false));
            serde_json::Value::Object(fields).to_string()
        }
        _ => stats.to_string(),
    }
}
