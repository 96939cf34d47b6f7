//! Merge (upsert) on key columns: matched target rows take the source row, others are inserted. The source
//! must hold at most one row per key.

use std::sync::Arc;

use crate::storage::Location;

use datafusion::prelude::DataFrame;

use super::{CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing, quote};

pub async fn upsert(
    path: &Location,
    source: DataFrame,
    keys: &[String],
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<WriteMetrics, DeltaError> {
    let schema = Arc::new(source.schema().as_arrow().clone());
    let mut options = options.clone();
    options.not_null.extend(keys.iter().cloned());
    let table = create_if_missing(path, &schema, &options).await?;
    let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let on = key_predicate(keys);
    let update_columns = columns.clone();
    let properties = super::writer_properties(&table);
    // The source query's session: a memory limit set on it holds for the merge's join too.
    let session = Arc::new(source.clone().into_parts().0);
    let (table, metrics) = table
        .merge(source, on)
        .with_session_state(session)
        .with_source_alias("s")
        .with_writer_properties(properties)
        .with_target_alias("t")
        .when_matched_update(|mut u| {
            for c in &update_columns {
                u = u.update(c.as_str(), format!("s.{}", quote(c)));
            }
            u
        })
        .and_then(|m| {
            m.when_not_matched_insert(|mut i| {
                for c in &columns {
                    i = i.set(c.as_str(), format!("s.{}", quote(c)));
                }
                i
            })
        })
        .map_err(|e| DeltaError::table(path, e))?
        .with_commit_properties(meta.properties())
        .await
        .map_err(|e| DeltaError::table(path, e))?;
    Ok(WriteMetrics {
        version: table.version(),
        rows_source: Some(metrics.num_source_rows as u64),
        rows_written: (metrics.num_target_rows_inserted + metrics.num_target_rows_updated) as u64,
        rows_inserted: metrics.num_target_rows_inserted as u64,
        rows_updated: metrics.num_target_rows_updated as u64,
        rows_deleted: metrics.num_target_rows_deleted as u64,
        files_added: metrics.num_target_files_added as u64,
    })
}

/// `t.k1 = s.k1 AND t.k2 = s.k2`.
pub(super) fn key_predicate(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("t.{0} = s.{0}", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}
