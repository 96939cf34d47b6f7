//! Data files written and committed by hand, for the writes delta-rs's operations make slower than they
//! need to be: a query's result is written by one Parquet writer per partition of its plan (encoding
//! and compression run on every core), and the files added and removed go into one Delta commit.

use std::collections::HashSet;

use datafusion::{execution::SendableRecordBatchStream, prelude::DataFrame};
use deltalake::{
    DeltaTable, DeltaTableError,
    kernel::{
        Action, Add,
        transaction::{CommitBuilder, CommitProperties},
    },
    protocol::DeltaOperation,
    writer::{DeltaWriter, RecordBatchWriter},
};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::task::JoinSet;

use super::{DeltaError, append::conform};
use crate::storage::Location;

/// Parquet files are cut at about this size while streaming.
pub(super) const TARGET_FILE_SIZE: u64 = 128 * 1024 * 1024;

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
) -> Result<Written, DeltaError> {
    let streams = frame
        .execute_stream_partitioned()
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    write_streams(path, || RecordBatchWriter::for_table(table), streams).await
}

/// As [`write_files`], for the partitions of a result already running, each written by a writer from
/// `new_writer` (for a table, or for one not created yet).
pub(super) async fn write_streams(
    path: &Location,
    new_writer: impl Fn() -> Result<RecordBatchWriter, DeltaTableError>,
    streams: Vec<SendableRecordBatchStream>,
) -> Result<Written, DeltaError> {
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let mut writer = new_writer()
            .map_err(|e| DeltaError::table(path, e))?
            .with_target_file_size(TARGET_FILE_SIZE)
            .with_writer_properties(super::writer_properties());
        let path = path.clone();
        tasks.spawn(async move {
            let schema = writer.arrow_schema();
            let mut rows = 0u64;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| DeltaError::query(&path, e))?;
                if batch.num_rows() == 0 {
                    continue;
                }
                rows += batch.num_rows() as u64;
                let batch = conform(&path, batch, &schema)?;
                writer
                    .write(batch)
                    .await
                    .map_err(|e| DeltaError::table(&path, e))?;
            }
            let adds = writer
                .flush()
                .await
                .map_err(|e| DeltaError::table(&path, e))?;
            Ok::<_, DeltaError>(Written { adds, rows })
        });
    }
    let mut written = Written::default();
    // On the first error the set is dropped, which stops the other writers.
    while let Some(done) = tasks.join_next().await {
        let part = done.map_err(|e| DeltaError::Invalid {
            table: path.to_string(),
            message: format!("a file writer stopped: {e}"),
        })??;
        written.adds.extend(part.adds);
        written.rows += part.rows;
    }
    Ok(written)
}

/// The remove actions for the files of `table` whose scan file ids (the full URLs in a scan's file
/// column) are `ids`. Every id must be a file of the table's loaded version.
pub(super) fn removes(
    path: &Location,
    table: &DeltaTable,
    ids: &HashSet<String>,
) -> Result<Vec<Action>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    let mut root = table.log_store().root_url().clone();
    if !root.path().ends_with('/') {
        let with_slash = format!("{}/", root.path());
        root.set_path(&with_slash);
    }
    let mut actions = Vec::with_capacity(ids.len());
    for file in snapshot.log_data() {
        let id = root.join(&file.path()).map_err(|e| DeltaError::Invalid {
            table: path.to_string(),
            message: format!("file `{}` has no URL under the table: {e}", file.path()),
        })?;
        if ids.contains(id.as_str()) {
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

/// The remove actions for every file of `table`'s loaded version.
pub(super) fn remove_all(path: &Location, table: &DeltaTable) -> Result<Vec<Action>, DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    Ok(snapshot
        .log_data()
        .into_iter()
        .map(|file| Action::Remove(file.remove_action(true)))
        .collect())
}

/// Deletes files written and never committed (best effort: a file left behind is invisible to
/// readers, and `medallion maintain` vacuums it). `table` may be one not created yet.
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
