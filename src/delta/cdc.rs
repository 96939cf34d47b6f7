//! CDC apply: a batch of change rows (one per source change, with an op column) becomes one MERGE. Within
//! the batch only the last change per key counts (ordered by `sequence_by`); against the table, a change
//! applies only if its sequence is newer than the row's, so re-applying a batch is a no-op.

use std::{path::Path, sync::Arc};

use datafusion::prelude::{DataFrame, SessionContext};

use super::{
    CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing, merge::key_predicate,
    quote,
};

/// How to read a change stream.
#[derive(Debug, Clone)]
pub struct CdcSpec {
    pub keys: Vec<String>,
    /// Columns ordering the changes of one key, most significant first; stored in the table.
    pub sequence_by: Vec<String>,
    /// Column holding the operation; not stored in the table.
    pub op_column: String,
    /// Op values that delete the key.
    pub delete_values: Vec<String>,
}

/// What a CDC apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdcMetrics {
    pub write: WriteMetrics,
    /// Change rows read.
    pub rows_read: u64,
    /// Change rows replaced by a later change of the same key in the same batch.
    pub rows_superseded: u64,
}

pub async fn apply_changes(
    path: &Path,
    ctx: &SessionContext,
    changes: DataFrame,
    spec: &CdcSpec,
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<CdcMetrics, DeltaError> {
    let invalid = |message: String| DeltaError::Invalid {
        table: path.display().to_string(),
        message,
    };
    let schema = changes.schema().as_arrow().clone();
    for column in spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .chain(std::iter::once(&spec.op_column))
    {
        if schema.field_with_name(column).is_err() {
            return Err(invalid(format!(
                "the stage's SQL has no column `{column}`, which the cdc write needs"
            )));
        }
    }
    let rows_read = changes
        .clone()
        .count()
        .await
        .map_err(|e| DeltaError::query(path, e))? as u64;
    if rows_read == 0 {
        return Ok(CdcMetrics::default());
    }

    // Last change per key within the batch.
    ctx.register_table("__medallion_changes", changes.into_view())
        .map_err(|e| DeltaError::query(path, e))?;
    let columns: Vec<String> = schema.fields().iter().map(|f| quote(f.name())).collect();
    let order: Vec<String> = spec
        .sequence_by
        .iter()
        .map(|c| format!("{} DESC NULLS LAST", quote(c)))
        .collect();
    let partition: Vec<String> = spec.keys.iter().map(|k| quote(k)).collect();
    let latest = ctx
        .sql(&format!(
            "SELECT {cols} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY {order}) \
             AS __medallion_rank FROM __medallion_changes) WHERE __medallion_rank = 1",
            cols = columns.join(", "),
            partition = partition.join(", "),
            order = order.join(", "),
        ))
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    let _ = ctx.deregister_table("__medallion_changes");

    // The table holds every column but the op.
    let stored: Vec<_> = schema
        .fields()
        .iter()
        .filter(|f| f.name() != &spec.op_column)
        .cloned()
        .collect();
    let stored_schema = Arc::new(datafusion::arrow::datatypes::Schema::new(stored));
    let mut options = options.clone();
    options.not_null.extend(spec.keys.iter().cloned());
    let table = create_if_missing(path, &stored_schema, &options).await?;
    let names: Vec<String> = stored_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();

    let deletes: Vec<String> = spec
        .delete_values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect();
    let op = format!("s.{}", quote(&spec.op_column));
    let is_delete = format!("{op} IN ({})", deletes.join(", "));
    let is_upsert = format!("({op} IS NULL OR {op} NOT IN ({}))", deletes.join(", "));
    let newer = newer_predicate(&spec.sequence_by);
    let update_names = names.clone();
    let (table, metrics) = table
        .merge(latest, key_predicate(&spec.keys))
        .with_source_alias("s")
        .with_target_alias("t")
        .when_matched_delete(|d| d.predicate(format!("{is_delete} AND {newer}")))
        .and_then(|m| {
            m.when_matched_update(|mut u| {
                u = u.predicate(format!("{is_upsert} AND {newer}"));
                for c in &update_names {
                    u = u.update(c.as_str(), format!("s.{}", quote(c)));
                }
                u
            })
        })
        .and_then(|m| {
            m.when_not_matched_insert(|mut i| {
                i = i.predicate(is_upsert.clone());
                for c in &names {
                    i = i.set(c.as_str(), format!("s.{}", quote(c)));
                }
                i
            })
        })
        .map_err(|e| DeltaError::table(path, e))?
        .with_commit_properties(meta.properties())
        .await
        .map_err(|e| DeltaError::table(path, e))?;
    let latest_rows = metrics.num_source_rows as u64;
    Ok(CdcMetrics {
        write: WriteMetrics {
            rows_source: None,
            version: table.version(),
            rows_written: (metrics.num_target_rows_inserted + metrics.num_target_rows_updated)
                as u64,
            rows_inserted: metrics.num_target_rows_inserted as u64,
            rows_updated: metrics.num_target_rows_updated as u64,
            rows_deleted: metrics.num_target_rows_deleted as u64,
            files_added: metrics.num_target_files_added as u64,
        },
        rows_read,
        rows_superseded: rows_read.saturating_sub(latest_rows),
    })
}

/// Lexicographic `s.seq > t.seq` over the sequence columns.
fn newer_predicate(sequence_by: &[String]) -> String {
    match sequence_by.split_first() {
        None => "TRUE".to_string(),
        Some((first, [])) => format!("s.{0} > t.{0}", quote(first)),
        Some((first, rest)) => format!(
            "(s.{0} > t.{0} OR (s.{0} = t.{0} AND {1}))",
            quote(first),
            newer_predicate(rest)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_is_lexicographic() {
        assert_eq!(
            newer_predicate(&["a".into(), "b".into()]),
            "(s.\"a\" > t.\"a\" OR (s.\"a\" = t.\"a\" AND s.\"b\" > t.\"b\"))"
        );
    }
}
