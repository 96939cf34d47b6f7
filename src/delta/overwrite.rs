//! Overwrite: replace the whole table, or only the rows of some values of one column, with a query's
//! result in one commit. The query streams through delta-rs's writer; it is not collected in memory.

use std::{collections::BTreeSet, sync::Arc};

use crate::storage::Location;

use datafusion::{
    common::ScalarValue,
    prelude::{DataFrame, Expr, col, lit},
};
use deltalake::{operations::write::SchemaMode, protocol::SaveMode};

use super::{CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing};

/// The rows an overwrite replaces: those whose `column` holds one of `values` (`None` is NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub column: String,
    pub values: BTreeSet<Option<String>>,
}

impl Scope {
    /// The predicate as SQL text: `"col" IN ('a', 'b') OR "col" IS NULL`.
    pub fn sql(&self) -> String {
        let column = format!("\"{}\"", self.column.replace('"', "\"\""));
        let values: Vec<String> = self
            .values
            .iter()
            .flatten()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect();
        let mut parts = Vec::new();
        if !values.is_empty() {
            parts.push(format!("{column} IN ({})", values.join(", ")));
        }
        if self.values.contains(&None) {
            parts.push(format!("{column} IS NULL"));
        }
        if parts.is_empty() {
            "FALSE".into()
        } else {
            format!("({})", parts.join(" OR "))
        }
    }

    /// `column IN (values) [OR column IS NULL]`, with the values typed like the column of `data`.
    pub fn predicate(&self, data: &DataFrame) -> Result<Expr, String> {
        let field = data
            .schema()
            .as_arrow()
            .field_with_name(&self.column)
            .map_err(|_| format!("the stage's SQL has no column `{}`", self.column))?
            .clone();
        let mut list = Vec::new();
        for value in self.values.iter().flatten() {
            let scalar = ScalarValue::try_from_string(value.clone(), field.data_type())
                .map_err(|e| format!("value `{value}` of `{}`: {e}", self.column))?;
            list.push(lit(scalar));
        }
        let column = col(datafusion::common::Column::new_unqualified(&self.column));
        let mut predicate = if list.is_empty() {
            lit(false)
        } else {
            column.clone().in_list(list, false)
        };
        if self.values.contains(&None) {
            predicate = predicate.or(column.is_null());
        }
        Ok(predicate)
    }
}

pub async fn overwrite(
    path: &Location,
    data: DataFrame,
    options: &TableOptions,
    meta: &CommitMeta,
    scope: Option<&Scope>,
) -> Result<WriteMetrics, DeltaError> {
    let invalid = |message: String| DeltaError::Invalid {
        table: path.to_string(),
        message,
    };
    let schema = Arc::new(data.schema().as_arrow().clone());
    let table = create_if_missing(path, &schema, options).await?;
    let predicate = scope
        .map(|s| s.predicate(&data))
        .transpose()
        .map_err(invalid)?;
    let data = match &predicate {
        Some(predicate) => data
            .filter(predicate.clone())
            .map_err(|e| DeltaError::query(path, e))?,
        None => data,
    };
    let (state, plan) = data.into_parts();
    // The write runs on the query's runtime, so the stage's memory limit holds for it too.
    let session = super::session_on(Some(state.runtime_env().clone()))?;
    drop(state);
    let mut builder = table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(session.state()))
        .with_save_mode(SaveMode::Overwrite)
        .with_writer_properties(super::writer_properties())
        .with_partition_columns(options.partition_by.clone())
        .with_commit_properties(meta.properties());
    builder = match predicate {
        Some(predicate) => builder.with_replace_where(predicate),
        None => builder.with_schema_mode(SchemaMode::Overwrite),
    };
    let table = builder.await.map_err(|e| DeltaError::table(path, e))?;
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
