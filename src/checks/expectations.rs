//! Expectations: row-level SQL predicates over a stage's output. A row violates an expectation when the
//! predicate is not true (false or NULL). A failing `fail` expectation stops the stage before its commit
//! and names the first offending row by its lineage (`_source_file`, `_source_row`) when the output has it.

use datafusion::prelude::{DataFrame, SessionContext};

use crate::{
    config::{Expectation, ExpectationAction},
    engine::EngineError,
};

/// The view name the stage output is registered under while checks run.
const VIEW: &str = "__medallion_output";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectationResult {
    pub name: String,
    pub action: ExpectationAction,
    pub column: Option<String>,
    pub violations: u64,
    /// `file`, `row` and the offending value of the first violation, when known.
    pub first: Option<(String, i64, Option<String>)>,
}

impl ExpectationResult {
    pub fn failed(&self) -> bool {
        self.action == ExpectationAction::Fail && self.violations > 0
    }

    /// ``expectation `x` failed for 3 row(s); first: file `f` row 7 column `amount` (value `$1x`)``
    pub fn describe(&self) -> String {
        let mut text = format!(
            "expectation `{}` failed for {} row(s)",
            self.name, self.violations
        );
        if let Some((file, row, value)) = &self.first {
            text.push_str(&format!("; first: file `{file}` row {row}"));
            if let Some(column) = &self.column {
                text.push_str(&format!(" column `{column}`"));
            }
            if let Some(value) = value {
                text.push_str(&format!(" (raw value `{value}`)"));
            }
        } else if let Some(column) = &self.column {
            text.push_str(&format!(" on column `{column}`"));
        }
        text
    }
}

/// Evaluates every expectation on `output`.
pub async fn evaluate(
    ctx: &SessionContext,
    output: &DataFrame,
    expectations: &[Expectation],
) -> Result<Vec<ExpectationResult>, EngineError> {
    if expectations.is_empty() {
        return Ok(Vec::new());
    }
    ctx.register_table(VIEW, output.clone().into_view())
        .map_err(|e| EngineError::query("cannot check expectations", e))?;
    let has = |c: &str| output.schema().field_with_unqualified_name(c).is_ok();
    let lineage = has("_source_file") && has("_source_row");
    let mut results = Vec::new();
    for expectation in expectations {
        let what = format!(
            "expectation `{}` (`{}`)",
            expectation.name, expectation.expr
        );
        let violating = format!("NOT COALESCE(({}), FALSE)", expectation.expr);
        let count = ctx
            .sql(&format!("SELECT COUNT(*) FROM {VIEW} WHERE {violating}"))
            .await
            .map_err(|e| EngineError::query(what.clone(), e))?
            .collect()
            .await
            .map_err(|e| EngineError::query(what.clone(), e))?;
        let violations = first_int(&count).unwrap_or(0) as u64;
        let mut first = None;
        if violations > 0 && lineage {
            let sql = format!(
                "SELECT _source_file, _source_row FROM {VIEW} WHERE {violating} \
                 ORDER BY _source_file, _source_row LIMIT 1"
            );
            let batches = ctx
                .sql(&sql)
                .await
                .map_err(|e| EngineError::query(what.clone(), e))?
                .collect()
                .await
                .map_err(|e| EngineError::query(what.clone(), e))?;
            first = first_lineage(&batches).map(|(file, row)| (file, row, None));
        }
        results.push(ExpectationResult {
            name: expectation.name.clone(),
            action: expectation.action,
            column: expectation.column.clone(),
            violations,
            first,
        });
    }
    let _ = ctx.deregister_table(VIEW);
    Ok(results)
}

fn first_int(batches: &[datafusion::arrow::record_batch::RecordBatch]) -> Option<i64> {
    use datafusion::arrow::{array::Int64Array, compute::cast, datatypes::DataType};
    let batch = batches.iter().find(|b| b.num_rows() > 0)?;
    let column = cast(batch.column(0), &DataType::Int64).ok()?;
    column
        .as_any()
        .downcast_ref::<Int64Array>()
        .map(|a| a.value(0))
}

fn first_lineage(
    batches: &[datafusion::arrow::record_batch::RecordBatch],
) -> Option<(String, i64)> {
    use datafusion::arrow::{
        array::{Int64Array, StringArray},
        compute::cast,
        datatypes::DataType,
    };
    let batch = batches.iter().find(|b| b.num_rows() > 0)?;
    let file = cast(batch.column(0), &DataType::Utf8).ok()?;
    let row = cast(batch.column(1), &DataType::Int64).ok()?;
    let file = file
        .as_any()
        .downcast_ref::<StringArray>()?
        .value(0)
        .to_string();
    let row = row.as_any().downcast_ref::<Int64Array>()?.value(0);
    Some((file, row))
}

/// A stage's output divided by its `drop` and `quarantine` expectations.
pub struct Split {
    /// Rows that pass every drop and quarantine expectation: what the stage writes.
    pub kept: DataFrame,
    /// Rows failing a quarantine expectation, with `_reason` (the names of the expectations they fail).
    pub rejected: Option<DataFrame>,
    pub dropped: u64,
    pub quarantined: u64,
}

/// Divides `output` by the expectations that remove rows. A row failing both kinds is quarantined.
pub async fn split(
    ctx: &SessionContext,
    output: DataFrame,
    expectations: &[Expectation],
) -> Result<Split, EngineError> {
    let passes = |e: &Expectation| format!("COALESCE(({}), FALSE)", e.expr);
    let of = |action: ExpectationAction| -> Vec<&Expectation> {
        expectations.iter().filter(|e| e.action == action).collect()
    };
    let (drops, quarantines) = (
        of(ExpectationAction::Drop),
        of(ExpectationAction::Quarantine),
    );
    if drops.is_empty() && quarantines.is_empty() {
        return Ok(Split {
            kept: output,
            rejected: None,
            dropped: 0,
            quarantined: 0,
        });
    }
    const SPLIT_VIEW: &str = "__medallion_split";
    let err = |e| EngineError::query("expectations that drop or quarantine rows", e);
    ctx.register_table(SPLIT_VIEW, output.into_view())
        .map_err(err)?;
    let all_pass = |list: &[&Expectation]| {
        if list.is_empty() {
            "TRUE".to_string()
        } else {
            list.iter()
                .map(|e| passes(e))
                .collect::<Vec<_>>()
                .join(" AND ")
        }
    };
    let keep = format!("{} AND {}", all_pass(&drops), all_pass(&quarantines));
    let kept = ctx
        .sql(&format!("SELECT * FROM {SPLIT_VIEW} WHERE {keep}"))
        .await
        .map_err(err)?;
    let counts = ctx
        .sql(&format!(
            "SELECT COUNT(*) FILTER (WHERE NOT ({q})) AS quarantined, \
                    COUNT(*) FILTER (WHERE ({q}) AND NOT ({d})) AS dropped FROM {SPLIT_VIEW}",
            q = all_pass(&quarantines),
            d = all_pass(&drops),
        ))
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)?;
    let count = |index: usize| {
        counts
            .iter()
            .find(|b| b.num_rows() > 0)
            .and_then(|b| {
                datafusion::arrow::compute::cast(
                    b.column(index),
                    &datafusion::arrow::datatypes::DataType::Int64,
                )
                .ok()
            })
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .map(|a| a.value(0) as u64)
            })
            .unwrap_or(0)
    };
    let (quarantined, dropped) = (count(0), count(1));
    let rejected = if quarantines.is_empty() {
        None
    } else {
        let reasons: Vec<String> = quarantines
            .iter()
            .map(|e| {
                format!(
                    "CASE WHEN NOT {} THEN '{}' END",
                    passes(e),
                    e.name.replace('\'', "''")
                )
            })
            .collect();
        Some(
            ctx.sql(&format!(
                "SELECT *, concat_ws('; ', {}) AS _reason FROM {SPLIT_VIEW} WHERE NOT ({})",
                reasons.join(", "),
                all_pass(&quarantines)
            ))
            .await
            .map_err(err)?,
        )
    };
    Ok(Split {
        kept,
        rejected,
        dropped,
        quarantined,
    })
}
