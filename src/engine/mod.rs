//! DataFusion: the query session a stage runs in (UDFs, `bronze`/`silver`/`gold` schemas, the tables it
//! reads), and stage SQL files. Reading only: commits belong to `delta/`.

pub mod scratch;
pub mod sql;
pub mod udf;

use std::sync::Arc;

use datafusion::{
    catalog::{MemorySchemaProvider, TableProvider},
    error::DataFusionError,
    prelude::{DataFrame, SessionContext, col, lit},
};

use crate::config::TableName;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what}: {}", source.message())]
    Query {
        what: String,
        source: DataFusionError,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

impl EngineError {
    pub fn query(what: impl Into<String>, source: DataFusionError) -> EngineError {
        EngineError::Query {
            what: what.into(),
            source,
        }
    }
}

/// Prepares `ctx` for stage SQL: medallion's UDFs are registered.
pub fn prepare(ctx: &SessionContext) {
    udf::register_all(ctx);
}

/// Registers `provider` as `schema.table`, optionally only the rows with `batch_column > after`.
pub fn register_table(
    ctx: &SessionContext,
    name: &TableName,
    provider: Arc<dyn TableProvider>,
    only_after: Option<(&str, i64)>,
) -> Result<(), EngineError> {
    let what = || format!("cannot register table `{name}`");
    let catalog = ctx.catalog("datafusion").ok_or_else(|| {
        EngineError::query(
            what(),
            DataFusionError::Internal("no default catalog".into()),
        )
    })?;
    if catalog.schema(&name.schema).is_none() {
        catalog
            .register_schema(&name.schema, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| EngineError::query(what(), e))?;
    }
    let reference = name.to_string();
    match only_after {
        None => ctx.register_table(reference.as_str(), provider),
        Some((column, after)) => {
            let increment = ctx
                .read_table(provider)
                .and_then(|df| df.filter(col(column).gt(lit(after))))
                .map_err(|e| EngineError::query(what(), e))?;
            ctx.register_table(reference.as_str(), increment.into_view())
        }
    }
    .map(|_| ())
    .map_err(|e| EngineError::query(what(), e))
}

/// Whether running `frame` again costs more than storing its result: its plan aggregates, joins, sorts
/// or computes windows, rather than only reading, filtering and projecting.
pub async fn plan_is_costly(frame: &DataFrame) -> Result<bool, DataFusionError> {
    let plan = frame.clone().create_physical_plan().await?;
    let mut pending = vec![plan];
    while let Some(node) = pending.pop() {
        let name = node.name();
        if name.contains("Aggregate")
            || name.contains("Join")
            || name.contains("Window")
            || name == "SortExec"
        {
            return Ok(true);
        }
        pending.extend(node.children().into_iter().cloned());
    }
    Ok(false)
}

/// Plans one SELECT.
pub async fn query(ctx: &SessionContext, what: &str, sql: &str) -> Result<DataFrame, EngineError> {
    ctx.sql(sql)
        .await
        .map_err(|e| EngineError::query(what.to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plans_that_aggregate_join_or_sort_are_costly_and_projections_are_not() {
        let ctx = SessionContext::new();
        let costly = |sql: &'static str| {
            let ctx = ctx.clone();
            async move { plan_is_costly(&ctx.sql(sql).await.unwrap()).await.unwrap() }
        };
        ctx.sql("CREATE VIEW t AS SELECT v, v % 7 AS k FROM generate_series(1, 1000) AS s(v)")
            .await
            .unwrap();
        assert!(!costly("SELECT v * 2 AS w, k FROM t WHERE v > 3").await);
        assert!(costly("SELECT k, SUM(v) FROM t GROUP BY k").await);
        assert!(costly("SELECT v FROM t ORDER BY k").await);
        assert!(costly("SELECT a.v FROM t a JOIN t b ON a.v = b.k").await);
        assert!(costly("SELECT v, ROW_NUMBER() OVER (PARTITION BY k ORDER BY v) FROM t").await);
    }
}
