//! The quarantine: rows a `quarantine` expectation rejected, kept at `<lake>/quarantine/<table>` with
//! `_reason`, their lineage (`_source_file`, `_source_row`), `_run_id`, `_stage`, and the raw values they
//! had in Bronze (or the stage's output as text when it does not read Bronze). Keyed on stage and lineage,
//! so re-running a batch after a crash does not quarantine a row twice.

use crate::storage::Location;

use datafusion::prelude::{DataFrame, SessionContext};

use crate::{
    config::TableName,
    delta::{self, CommitMeta, DeltaError, TableOptions},
    landing::{BronzeLayout, SOURCE_FILE, SOURCE_ROW},
};

/// `silver.transactions` → `quarantine.transactions`.
pub fn quarantine_table(target: &TableName) -> TableName {
    TableName {
        schema: "quarantine".into(),
        table: target.table.clone(),
    }
}

/// Writes the rejected rows to the quarantine table at `path`, created to keep `history_days` of
/// history; `bronze` is the (batch-filtered) Bronze table the stage read, if any.
pub async fn write_quarantine(
    ctx: &SessionContext,
    rejected: DataFrame,
    bronze: Option<&TableName>,
    path: &Location,
    history_days: u32,
    meta: &CommitMeta,
) -> Result<u64, DeltaError> {
    const REJECTED: &str = "__medallion_rejected";
    let query = |e| DeltaError::Query {
        table: path.to_string(),
        source: e,
    };
    let has = |c: &str| rejected.schema().field_with_unqualified_name(c).is_ok();
    let lineage = has(SOURCE_FILE) && has(SOURCE_ROW);
    let output_columns: Vec<String> = rejected
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| n != "_reason" && n != SOURCE_FILE && n != SOURCE_ROW)
        .collect();
    ctx.register_table(REJECTED, rejected.into_view())
        .map_err(query)?;
    let tail = format!(
        "r._reason, '{run}' AS _run_id, '{stage}' AS _stage, now() AS _quarantined_at",
        run = meta.run_id.replace('\'', "''"),
        stage = meta.stage.replace('\'', "''"),
    );
    let raw_bronze = match bronze {
        Some(table) if lineage => ctx.table_provider(table.to_string()).await.ok(),
        _ => None,
    };
    let sql = match (raw_bronze, bronze) {
        (Some(provider), Some(table)) => {
            let raw: Vec<String> = provider
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|n| !BronzeLayout::LINEAGE.contains(&n.as_str()))
                .map(|n| format!("b.\"{n}\""))
                .collect();
            format!(
                "SELECT {raw}, r.{SOURCE_FILE}, r.{SOURCE_ROW}, {tail} FROM {REJECTED} r \
                 JOIN {table} b ON b.{SOURCE_FILE} = r.{SOURCE_FILE} AND b.{SOURCE_ROW} = r.{SOURCE_ROW}",
                raw = raw.join(", "),
            )
        }
        _ => {
            let mut columns: Vec<String> = output_columns
                .iter()
                .map(|n| format!("CAST(r.\"{n}\" AS VARCHAR) AS \"{n}\""))
                .collect();
            if lineage {
                columns.push(format!("r.{SOURCE_FILE}, r.{SOURCE_ROW}"));
            }
            format!("SELECT {}, {tail} FROM {REJECTED} r", columns.join(", "))
        }
    };
    let rows = ctx.sql(&sql).await.map_err(query)?;
    let options = TableOptions {
        description: Some(format!(
            "Rows rejected by the quarantine expectations of {}",
            meta.stage
        )),
        history_days: Some(history_days),
        ..TableOptions::default()
    };
    let metrics = if lineage {
        let keys = ["_stage", SOURCE_FILE, SOURCE_ROW].map(String::from);
        delta::upsert(path, rows, &keys, &options, meta).await?
    } else {
        delta::append_frame(path, rows, &options, meta).await?
    };
    Ok(metrics.rows_written)
}
