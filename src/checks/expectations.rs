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

/// What one pass over a stage's output found.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub results: Vec<ExpectationResult>,
    /// Rows of the output.
    pub rows: u64,
    /// Rows failing a quarantine expectation, and rows failing only drop expectations (see [`split`]).
    pub quarantined: u64,
    pub dropped: u64,
}

/// Evaluates every expectation on `output` and counts its rows, in one pass over it: the stage's SQL
/// (file scan, parsing UDFs) runs once here, not once per expectation. The first offending row of a
/// failing expectation is looked up afterwards, only for those that fail.
pub async fn evaluate(
    ctx: &SessionContext,
    output: &DataFrame,
    expectations: &[Expectation],
) -> Result<Evaluation, EngineError> {
    ctx.register_table(VIEW, output.clone().into_view())
        .map_err(|e| EngineError::query("cannot check expectations", e))?;
    let violating = |e: &Expectation| format!("NOT COALESCE(({}), FALSE)", e.expr);
    let (quarantines, drops) = (
        all_pass(expectations, ExpectationAction::Quarantine),
        all_pass(expectations, ExpectationAction::Drop),
    );
    let mut columns = vec![
        "COUNT(*)".to_string(),
        format!("COUNT(*) FILTER (WHERE NOT ({quarantines}))"),
        format!("COUNT(*) FILTER (WHERE ({quarantines}) AND NOT ({drops}))"),
    ];
    columns.extend(
        expectations
            .iter()
            .map(|e| format!("COUNT(*) FILTER (WHERE {})", violating(e))),
    );
    let what = if expectations.is_empty() {
        "counting the stage's rows".to_string()
    } else {
        let names: Vec<String> = expectations
            .iter()
            .map(|e| format!("`{}`", e.name))
            .collect();
        format!("expectations {}", names.join(", "))
    };
    let counts = ctx
        .sql(&format!("SELECT {} FROM {VIEW}", columns.join(", ")))
        .await
        .map_err(|e| EngineError::query(what.clone(), e))?
        .collect()
        .await
        .map_err(|e| EngineError::query(what.clone(), e))?;
    let count = |index: usize| nth_int(&counts, index).unwrap_or(0) as u64;
    let has = |c: &str| output.schema().field_with_unqualified_name(c).is_ok();
    let lineage = has("_source_file") && has("_source_row");
    let mut results = Vec::new();
    for (index, expectation) in expectations.iter().enumerate() {
        let violations = count(3 + index);
        let mut first = None;
        if violations > 0 && lineage {
            let what = format!(
                "expectation `{}` (`{}`)",
                expectation.name, expectation.expr
            );
            let sql = format!(
                "SELECT _source_file, _source_row FROM {VIEW} WHERE {} \
                 ORDER BY _source_file, _source_row LIMIT 1",
                violating(expectation)
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
    Ok(Evaluation {
        results,
        rows: count(0),
        quarantined: count(1),
        dropped: count(2),
    })
}

/// `(e1) AND (e2) ...` over the expectations with `action`, each NULL counted as failing; `TRUE` if none.
fn all_pass(expectations: &[Expectation], action: ExpectationAction) -> String {
    let list: Vec<String> = expectations
        .iter()
        .filter(|e| e.action == action)
        .map(|e| format!("COALESCE(({}), FALSE)", e.expr))
        .collect();
    if list.is_empty() {
        "TRUE".into()
    } else {
        list.join(" AND ")
    }
}

/// The integer in column `index` of the first row.
fn nth_int(batches: &[datafusion::arrow::record_batch::RecordBatch], index: usize) -> Option<i64> {
    use datafusion::arrow::{array::Int64Array, compute::cast, datatypes::DataType};
    let batch = batches.iter().find(|b| b.num_rows() > 0)?;
    let column = cast(batch.columns().get(index)?, &DataType::Int64).ok()?;
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

/// Divides `output` by the expectations that remove rows (counted by [`evaluate`] over the same
/// `output`). A row failing both kinds is quarantined.
pub async fn split(
    ctx: &SessionContext,
    output: DataFrame,
    expectations: &[Expectation],
    evaluation: &Evaluation,
) -> Result<Split, EngineError> {
    let passes = |e: &Expectation| format!("COALESCE(({}), FALSE)", e.expr);
    let quarantines: Vec<&Expectation> = expectations
        .iter()
        .filter(|e| e.action == ExpectationAction::Quarantine)
        .collect();
    let removes_rows = expectations.iter().any(|e| {
        matches!(
            e.action,
            ExpectationAction::Drop | ExpectationAction::Quarantine
        )
    });
    // Counted none to remove: the output as it is, not filtered again at every read of it.
    if !removes_rows || evaluation.dropped + evaluation.quarantined == 0 {
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
    let keep = format!(
        "{} AND {}",
        all_pass(expectations, ExpectationAction::Drop),
        all_pass(expectations, ExpectationAction::Quarantine)
    );
    let kept = ctx
        .sql(&format!("SELECT * FROM {SPLIT_VIEW} WHERE {keep}"))
        .await
        .map_err(err)?;
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
                all_pass(expectations, ExpectationAction::Quarantine)
            ))
            .await
            .map_err(err)?,
        )
    };
    Ok(Split {
        kept,
        rejected,
        dropped: evaluation.dropped,
        quarantined: evaluation.quarantined,
    })
}
