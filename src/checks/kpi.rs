//! KPI and reconciliation checks: a scalar SQL query over the stage's candidate result (`candidate`, the
//! target as it would be after the write; `batch`, the rows being written; any pipeline table by name),
//! compared with a threshold, another query, or the previous run's value. Values compare as exact
//! decimals, so money reconciles to the cent.

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
    sync::Arc,
};

use datafusion::{
    arrow::{
        array::{Array, AsArray},
        compute::cast,
        datatypes::{DataType, SchemaRef},
    },
    common::tree_node::TreeNodeRecursion,
    datasource::MemTable,
    logical_expr::LogicalPlan,
    prelude::SessionContext,
};
use rust_decimal::Decimal;

use super::partials::Partials;
use crate::{
    config::{Check, CheckRule, Severity},
    engine::EngineError,
};

/// The target as it would be after the write.
pub const CANDIDATE: &str = "candidate";
/// The stage's output.
pub const BATCH: &str = "batch";
/// The rows the write adds, as stored: a cdc write's inserts and updated rows, any other write's batch.
/// A check over it costs what the batch costs; over [`CANDIDATE`], what the table costs.
pub const CHANGED: &str = "changed";
/// The tables a check reads besides the pipeline's own (`layer.table`).
pub const RELATIONS: [&str; 3] = [CANDIDATE, BATCH, CHANGED];

/// How one check (or expectation) came out; recorded in the run report and in run history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    pub name: String,
    /// `expectation`, `check` or `accounting`.
    pub kind: String,
    /// `warn` or `error` (expectations: their action).
    pub severity: String,
    /// The observed value as text (`NULL` when the query gave none).
    pub observed: String,
    /// What it was compared with, as text (`> 0`, `= 1234.56 ± 0`, `within 50% of 1000`).
    pub threshold: String,
    pub passed: bool,
}

impl CheckResult {
    /// Whether this result stops the stage.
    pub fn blocks(&self) -> bool {
        !self.passed && (self.severity == "error" || self.severity == "fail")
    }

    pub fn describe(&self) -> String {
        format!(
            "{} `{}` {}: observed {}, expected {}",
            self.kind,
            self.name,
            if self.passed { "passed" } else { "failed" },
            self.observed,
            self.threshold
        )
    }
}

/// Evaluates `checks`; `previous` holds each check's observed value in the stage's last successful run.
/// An aggregate over a whole lake table in `partials` is answered from its files' partials.
pub async fn evaluate(
    ctx: &SessionContext,
    checks: &[Check],
    previous: &BTreeMap<String, String>,
    partials: &Partials,
) -> Result<Vec<CheckResult>, EngineError> {
    let mut results = Vec::new();
    for check in checks {
        let what = format!("check `{}`", check.name);
        let observed = scalar(ctx, &check.query, &what, partials).await?;
        let (threshold, passed) = match &check.rule {
            CheckRule::Compare { op, value } => (
                format!("{} {value}", op.symbol()),
                observed.is_some_and(|o| op.holds(o, *value)),
            ),
            CheckRule::Between { low, high } => (
                format!("between {low} and {high}"),
                observed.is_some_and(|o| *low <= o && o <= *high),
            ),
            CheckRule::Equals { query, tolerance } => {
                let other = scalar(ctx, query, &what, partials).await?;
                let text = other.map_or("NULL".to_string(), |v| v.to_string());
                let passed = match (observed, other) {
                    (Some(a), Some(b)) => (a - b).abs() <= *tolerance,
                    (None, None) => true,
                    _ => false,
                };
                (format!("= {text} ± {tolerance} ({query})"), passed)
            }
            CheckRule::MaxChangePct(pct) => {
                let before = previous
                    .get(&check.name)
                    .and_then(|v| Decimal::from_str(v).ok());
                match (before, observed) {
                    // The first run has nothing to compare with.
                    (None, _) => (format!("within {pct}% of the previous run (none)"), true),
                    (Some(before), Some(now)) => {
                        let limit = before.abs() * *pct / Decimal::ONE_HUNDRED;
                        (
                            format!("within {pct}% of the previous run's {before}"),
                            (now - before).abs() <= limit,
                        )
                    }
                    (Some(before), None) => (
                        format!("within {pct}% of the previous run's {before}"),
                        false,
                    ),
                }
            }
        };
        results.push(CheckResult {
            name: check.name.clone(),
            kind: "check".into(),
            severity: match check.severity {
                Severity::Warn => "warn".into(),
                Severity::Error => "error".into(),
            },
            observed: observed.map_or("NULL".into(), |v| v.normalize().to_string()),
            threshold,
            passed,
        });
    }
    Ok(results)
}

/// What checks read of the candidate result's relations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// The columns read, by index in the relations' schema.
    pub columns: Vec<usize>,
    /// The relations read (some of `tables`), even for their row count alone.
    pub tables: BTreeSet<String>,
}

/// What `checks` read from `tables` (names of the candidate result, all of `schema`), found by
/// planning every query against empty tables of that schema. `None` when a query does not plan here:
/// its evaluation reports why.
pub async fn columns_read(
    ctx: &SessionContext,
    checks: &[Check],
    schema: SchemaRef,
    tables: &[&str],
) -> Option<Reads> {
    let mut read = BTreeSet::new();
    let mut scanned = BTreeSet::new();
    for table in tables {
        let empty = MemTable::try_new(schema.clone(), vec![vec![]]).ok()?;
        ctx.register_table(*table, Arc::new(empty)).ok()?;
    }
    let mut planned = true;
    let queries = checks.iter().flat_map(|check| match &check.rule {
        CheckRule::Equals { query, .. } => vec![&check.query, query],
        _ => vec![&check.query],
    });
    for query in queries {
        let plan = match ctx.sql(query).await.map(|q| q.into_optimized_plan()) {
            Ok(Ok(plan)) => plan,
            _ => {
                planned = false;
                break;
            }
        };
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some(table) = tables.iter().find(|t| scan.table_name.table() == **t)
            {
                scanned.insert(table.to_string());
                match &scan.projection {
                    Some(columns) => read.extend(columns.iter().copied()),
                    None => read.extend(0..schema.fields().len()),
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    for table in tables {
        let _ = ctx.deregister_table(*table);
    }
    planned.then(|| Reads {
        columns: read.into_iter().collect(),
        tables: scanned,
    })
}

/// The first value of the first row of `sql`, as an exact decimal (`None` for NULL or no row).
async fn scalar(
    ctx: &SessionContext,
    sql: &str,
    what: &str,
    partials: &Partials,
) -> Result<Option<Decimal>, EngineError> {
    let failed = |e| EngineError::query(what.to_string(), e);
    let frame = ctx.sql(sql).await.map_err(failed)?;
    let plan = frame.clone().into_optimized_plan().map_err(failed)?;
    // Partials that cannot be had (a file unreadable alone, memory) leave the query as it is.
    let frame = match super::partials::rewrite(ctx, sql, &plan, partials).await {
        Ok(Some(plan)) => ctx.execute_logical_plan(plan).await.map_err(failed)?,
        Ok(None) => frame,
        Err(error) => {
            tracing::warn!(
                check = what,
                "not answered from partial aggregates: {error}"
            );
            frame
        }
    };
    let task = Arc::new(frame.task_ctx());
    let plan = frame.create_physical_plan().await.map_err(failed)?;
    // `-vv` shows how each check runs, which is where a slow check shows why.
    tracing::trace!(
        check = what,
        "plan:\n{}",
        datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
    );
    let batches = datafusion::physical_plan::collect(plan, task)
        .await
        .map_err(failed)?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let text = cast(batch.column(0), &DataType::Utf8)
        .map_err(|e| EngineError::query(what.to_string(), e.into()))?;
    let text = text.as_string::<i32>();
    if text.is_null(0) {
        return Ok(None);
    }
    let value = text.value(0);
    let parsed = match value {
        "true" => Some(Decimal::ONE),
        "false" => Some(Decimal::ZERO),
        _ => Decimal::from_str(value)
            .or_else(|_| Decimal::from_scientific(value))
            .ok(),
    };
    let parsed = parsed.ok_or_else(|| EngineError::Invalid {
        what: what.to_string(),
        message: format!("its query must give one number, got `{value}`"),
    })?;
    Ok(Some(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CompareOp, parse_expect};

    #[test]
    fn parses_rules() {
        assert_eq!(
            parse_expect("> 0"),
            Ok(CheckRule::Compare {
                op: CompareOp::Gt,
                value: Decimal::ZERO
            })
        );
        assert_eq!(
            parse_expect("between -1.5 and 10"),
            Ok(CheckRule::Between {
                low: Decimal::new(-15, 1),
                high: Decimal::TEN
            })
        );
        assert!(parse_expect("about 3").is_err());
    }

    #[tokio::test]
    async fn the_columns_checks_read_are_found_by_planning_their_queries() {
        use datafusion::arrow::datatypes::{Field, Schema};
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE other AS VALUES (1)").await.unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("c", DataType::Utf8, true),
        ]));
        let check = |query: &str, rule: CheckRule| Check {
            name: "c".into(),
            query: query.into(),
            rule,
            severity: Severity::Error,
        };
        let positive = || CheckRule::Compare {
            op: crate::config::CompareOp::Gt,
            value: Decimal::ZERO,
        };
        let read = |checks: Vec<Check>| {
            let ctx = ctx.clone();
            let schema = schema.clone();
            async move { columns_read(&ctx, &checks, schema, &["candidate", "batch"]).await }
        };
        let reads = |columns: Vec<usize>, tables: &[&str]| {
            Some(Reads {
                columns,
                tables: tables.iter().map(|t| t.to_string()).collect(),
            })
        };
        // A count reads no column, but it reads the relation.
        assert_eq!(
            read(vec![check("SELECT COUNT(*) FROM candidate", positive())]).await,
            reads(vec![], &["candidate"])
        );
        let sums = check(
            "SELECT SUM(b) FROM candidate",
            CheckRule::Equals {
                query: "SELECT COUNT(DISTINCT c) FROM batch WHERE c IN (SELECT 'x' FROM other)"
                    .into(),
                tolerance: Decimal::ZERO,
            },
        );
        assert_eq!(
            read(vec![sums]).await,
            reads(vec![1, 2], &["batch", "candidate"])
        );
        assert_eq!(
            read(vec![check("SELECT * FROM candidate", positive())]).await,
            reads(vec![0, 1, 2], &["candidate"])
        );
        // A query that does not plan (its evaluation will say why) tells nothing.
        assert_eq!(
            read(vec![check("SELECT nope FROM candidate", positive())]).await,
            None
        );
        assert!(ctx.table_exist("candidate").is_ok_and(|exists| !exists));
    }

    #[tokio::test]
    async fn reconciles_exactly_to_the_cent() {
        let ctx = SessionContext::new();
        let checks = vec![Check {
            name: "sums".into(),
            query: "SELECT CAST(100.10 AS DECIMAL(18,2))".into(),
            rule: CheckRule::Equals {
                query: "SELECT CAST(100.11 AS DECIMAL(18,2))".into(),
                tolerance: Decimal::ZERO,
            },
            severity: Severity::Error,
        }];
        let results = evaluate(&ctx, &checks, &BTreeMap::new(), &Partials::default())
            .await
            .unwrap();
        assert!(!results[0].passed && results[0].blocks(), "{results:?}");
        assert_eq!(results[0].observed, "100.1");
    }

    #[tokio::test]
    async fn day_over_day_change() {
        let ctx = SessionContext::new();
        let checks = vec![Check {
            name: "volume".into(),
            query: "SELECT 160".into(),
            rule: CheckRule::MaxChangePct(Decimal::from(50)),
            severity: Severity::Warn,
        }];
        let previous = BTreeMap::from([("volume".to_string(), "100".to_string())]);
        let results = evaluate(&ctx, &checks, &previous, &Partials::default())
            .await
            .unwrap();
        assert!(!results[0].passed && !results[0].blocks());
        let previous = BTreeMap::from([("volume".to_string(), "120".to_string())]);
        assert!(
            evaluate(&ctx, &checks, &previous, &Partials::default())
                .await
                .unwrap()[0]
                .passed
        );
    }
}
