//! Overwrite: replace the whole table with a query's result in one commit. The query streams through
//! delta-rs's writer; it is not collected in memory.

use std::{path::Path, sync::Arc};

use datafusion::prelude::DataFrame;
use deltalake::{operations::write::SchemaMode, protocol::SaveMode};

use super::{CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing};

pub async fn overwrite(
    path: &Path,
    data: DataFrame,
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<WriteMetrics, DeltaError> {
    let schema = Arc::new(data.schema().as_arrow().clone());
    let table = create_if_missing(path, &schema, options).await?;
    let session = super::session()?;
    let (state, plan) = data.into_parts();
    drop(state);
    let table = table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(session.state()))
        .with_save_mode(SaveMode::Overwrite)
        .with_schema_mode(SchemaMode::Overwrite)
        .with_partition_columns(options.partition_by.clone())
        .with_commit_properties(meta.properties())
        .await
        .map_err(|e| DeltaError::table(path, e))?;
    let metrics = last_write_metrics(&table).await;
    Ok(WriteMetrics {
        version: table.version(),
        rows_source: None,
        rows_written: metrics.0,
        rows_inserted: metrics.0,
        files_added: metrics.1,
        ..WriteMetrics::default()
    })
}

/// (rows, files) added by the table's latest commit, from its commit info.
async fn last_write_metrics(table: &deltalake::DeltaTable) -> (u64, u64) {
    use futures::StreamExt;
    let mut history = table.history(Some(1));
    let Some(Ok(info)) = history.next().await else {
        return (0, 0);
    };
    let metrics = info.info.get("operationMetrics");
    let get = |key: &str| {
        metrics
            .and_then(|m| m.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    (get("num_added_rows"), get("num_added_files"))
}
