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

/// Plans one SELECT.
pub async fn query(ctx: &SessionContext, what: &str, sql: &str) -> Result<DataFrame, EngineError> {
    ctx.sql(sql)
        .await
        .map_err(|e| EngineError::query(what.to_string(), e))
}
