//! Overwrite: replace the whole table, or only the rows of some values of one column, with a query's
//! result in one commit. The query streams through the table's file writers
//! ([`super::file_writer`]); it is not collected in memory.

use std::{collections::BTreeSet, sync::Arc};

use crate::storage::Location;

use chrono::Datelike;
use datafusion::{
    arrow::datatypes::{DataType, SchemaRef},
    common::ScalarValue,
    execution::SendableRecordBatchStream,
    physical_plan::{
        ExecutionPlan,
        aggregates::AggregateExec,
        filter::FilterExec,
        joins::{CrossJoinExec, HashJoinExec, NestedLoopJoinExec, SortMergeJoinExec},
        projection::ProjectionExec,
        sorts::sort::SortExec,
        sorts::sort_preserving_merge::SortPreservingMergeExec,
        windows::{BoundedWindowAggExec, WindowAggExec},
    },
    prelude::{DataFrame, Expr, col, lit},
};
use deltalake::{
    kernel::Action,
    operations::write::SchemaMode,
    protocol::{DeltaOperation, SaveMode},
    writer::RecordBatchWriter,
};

use super::{
    CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing, slices::Slices,
};

/// The rows an overwrite replaces: those whose `column` holds one of `values` (`None` is NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub column: String,
    pub values: BTreeSet<Option<String>>,
}

/// A scope written with more terms (single values and runs) than this is not worth a predicate: the
/// stage rebuilds the whole table instead. DataFusion's planner also recurses once per term, so a
/// predicate of thousands overflows the stack (seen with 3,650 touched dates).
pub const MAX_SCOPE_TERMS: usize = 256;

/// One part of a scope's predicate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    One(String),
    /// Every value from the first to the last, both included: consecutive dates or integers.
    Run(String, String),
}

impl Scope {
    /// The values as terms, with runs of consecutive dates or integers (for a column of that type) as
    /// one range each: ten years of touched dates are one term.
    fn terms(&self, data_type: &DataType) -> Vec<Term> {
        let values: Vec<&String> = self.values.iter().flatten().collect();
        let ordinals: Option<Vec<i64>> = match data_type {
            DataType::Date32 | DataType::Date64 => values
                .iter()
                .map(|v| {
                    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
                        .ok()
                        .map(|d| i64::from(d.num_days_from_ce()))
                })
                .collect(),
            t if t.is_integer() => values.iter().map(|v| v.parse::<i64>().ok()).collect(),
            _ => None,
        };
        let Some(ordinals) = ordinals else {
            return values.into_iter().cloned().map(Term::One).collect();
        };
        let mut pairs: Vec<(i64, &String)> = ordinals.into_iter().zip(values).collect();
        pairs.sort();
        let mut terms = Vec::new();
        let mut index = 0;
        while index < pairs.len() {
            let mut last = index;
            while last + 1 < pairs.len() && pairs[last + 1].0 == pairs[last].0 + 1 {
                last += 1;
            }
            terms.push(if last == index {
                Term::One(pairs[index].1.clone())
            } else {
                Term::Run(pairs[index].1.clone(), pairs[last].1.clone())
            });
            index = last + 1;
        }
        terms
    }

    /// Whether the scope is small enough to write as a predicate on `data` (see [`MAX_SCOPE_TERMS`]).
    pub fn fits(&self, data: &DataFrame) -> bool {
        match data.schema().as_arrow().field_with_name(&self.column) {
            Ok(field) => self.terms(field.data_type()).len() <= MAX_SCOPE_TERMS,
            Err(_) => true,
        }
    }

    /// The predicate as SQL text, e.g. `("col" IN ('a', 'b') OR "col" BETWEEN 'c' AND 'f' OR "col" IS
    /// NULL)`, for a column of `data_type`.
    pub fn sql(&self, data_type: &DataType) -> String {
        let column = format!("\"{}\"", self.column.replace('"', "\"\""));
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let mut ones = Vec::new();
        let mut parts = Vec::new();
        for term in self.terms(data_type) {
            match term {
                Term::One(value) => ones.push(quote(&value)),
                Term::Run(low, high) => parts.push(format!(
                    "{column} BETWEEN {} AND {}",
                    quote(&low),
                    quote(&high)
                )),
            }
        }
        if !ones.is_empty() {
            parts.insert(0, format!("{column} IN ({})", ones.join(", ")));
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

    /// The same predicate as [`Scope::sql`], with the values typed like the column of `data`.
    pub fn predicate(&self, data: &DataFrame) -> Result<Expr, String> {
        let data_type = column_type(data, &self.column)?;
        let typed = |value: &String| typed_literal(value, &data_type, &self.column);
        let column = col(datafusion::common::Column::new_unqualified(&self.column));
        let mut ones = Vec::new();
        let mut parts = Vec::new();
        for term in self.terms(&data_type) {
            match term {
                Term::One(value) => ones.push(typed(&value)?),
                Term::Run(low, high) => {
                    parts.push(column.clone().between(typed(&low)?, typed(&high)?))
                }
            }
        }
        if !ones.is_empty() {
            parts.insert(0, column.clone().in_list(ones, false));
        }
        if self.values.contains(&None) {
            parts.push(column.is_null());
        }
        Ok(any_of(parts))
    }
}

/// The type of `column` in `data`'s schema.
pub(super) fn column_type(data: &DataFrame, column: &str) -> Result<DataType, String> {
    data.schema()
        .as_arrow()
        .field_with_name(column)
        .map(|f| f.data_type().clone())
        .map_err(|_| format!("the stage's SQL has no column `{column}`"))
}

/// `value`, written as text (as in a Delta log), as a literal of `column`'s `data_type`.
pub(super) fn typed_literal(
    value: &str,
    data_type: &DataType,
    column: &str,
) -> Result<Expr, String> {
    ScalarValue::try_from_string(value.to_string(), data_type)
        .map(lit)
        .map_err(|e| format!("value `{value}` of `{column}`: {e}"))
}

/// `a OR b OR ...` as a balanced tree, so that its depth grows with the log of the number of parts.
fn any_of(mut parts: Vec<Expr>) -> Expr {
    if parts.is_empty() {
        return lit(false);
    }
    while parts.len() > 1 {
        let mut next = Vec::with_capacity(parts.len().div_ceil(2));
        let mut pairs = parts.into_iter();
        while let Some(left) = pairs.next() {
            next.push(match pairs.next() {
                Some(right) => left.or(right),
                None => left,
            });
        }
        parts = next;
    }
    parts.pop().unwrap_or_else(|| lit(false))
}

pub async fn overwrite(
    path: &Location,
    mut data: DataFrame,
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
    let mut full_by_scope = false;
    let mut predicate = scope
        .map(|s| s.predicate(&data))
        .transpose()
        .map_err(invalid)?;
    if let Some(scope_predicate) = &predicate
        && !holds_rows_outside(path, &table, scope_predicate).await?
    {
        // Every row of the table is in the scope (a batch touching all its dates): replacing the whole
        // table is the same write, without the replace-where's reading of every file to find the rows
        // to keep, of which there are none.
        data = data
            .filter(scope_predicate.clone())
            .map_err(|e| DeltaError::query(path, e))?;
        predicate = None;
        full_by_scope = true;
    }
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
    let properties = super::writer_properties(&table);
    let mut builder = table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_session_state(Arc::new(session.state()))
        .with_save_mode(SaveMode::Overwrite)
        .with_writer_properties(properties)
        .with_partition_columns(options.partition_by.clone())
        .with_commit_properties(meta.properties());
    builder = match predicate {
        Some(predicate) => builder.with_replace_where(predicate),
        // A scoped write keeps the table's schema, as the replace-where would.
        None if full_by_scope => builder,
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

/// An overwrite that replaces every row of the table with the same columns, written in two steps so
/// that checks can read what is written before it is published: [`Replacement::write`] writes the new
/// files, [`Staged::commit`] swaps them for the old ones in one commit (creating the table if it does
/// not exist yet), or [`Staged::discard`] deletes them. Until the commit, readers see the table as it
/// was, or no table.
pub struct Replacement {
    target: Target,
    data: DataFrame,
    /// The ranges to compute `data` in when its query holds state (see [`Replacement::execute`]).
    slices: Option<Slices>,
    /// Where the writers may finish their files: the slices' bounds, once the result is computed in
    /// them.
    cuts: Option<super::files::Cuts>,
}

/// Where a replacement goes.
struct Target {
    path: Location,
    /// `None` while the table does not exist.
    table: Option<deltalake::DeltaTable>,
    /// The data's schema, which a new table gets.
    schema: SchemaRef,
    options: TableOptions,
}

impl Replacement {
    /// The replacement for an overwrite of `data` in `scope`, when it replaces the whole table (a new
    /// table, no scope, or a scope that holds every row) and keeps its columns and types; `None`
    /// otherwise (an overwrite of part of the table, or one that changes its schema, goes through
    /// [`overwrite`]). `slices`, when given, are ranges of a column such that each output row depends
    /// only on input rows in its range.
    pub async fn plan(
        path: &Location,
        data: DataFrame,
        options: &TableOptions,
        scope: Option<&Scope>,
        slices: Option<Slices>,
    ) -> Result<Option<Replacement>, DeltaError> {
        let schema = Arc::new(data.schema().as_arrow().clone());
        let table = super::open(path).await?;
        let data = match scope {
            None => data,
            Some(scope) => {
                let predicate = scope
                    .predicate(&data)
                    .map_err(|message| DeltaError::Invalid {
                        table: path.to_string(),
                        message,
                    })?;
                if let Some(table) = &table
                    && holds_rows_outside(path, table, &predicate).await?
                {
                    return Ok(None);
                }
                data.filter(predicate)
                    .map_err(|e| DeltaError::query(path, e))?
            }
        };
        if let Some(table) = &table {
            let stored = RecordBatchWriter::for_table(table)
                .map_err(|e| DeltaError::table(path, e))?
                .arrow_schema();
            if !super::same_columns(&stored, &schema) {
                return Ok(None);
            }
        }
        Ok(Some(Replacement {
            target: Target {
                path: path.clone(),
                table,
                schema,
                options: options.clone(),
            },
            data,
            slices,
            cuts: None,
        }))
    }

    /// Starts the query: the partitions of its result, to hand to [`Replacement::write`], and the number
    /// of slices it is computed in (1: all at once). A Delta table has no row order, so a final
    /// `ORDER BY` is not run (delta-rs's own writes drop it too): sorting ten million Gold rows cost more
    /// than the rest of the stage, and more memory than a 1 GiB limit. A query that holds state
    /// (aggregations, joins, sorts, windows) runs one slice after another when there are slices: its
    /// memory is that of a slice, not of the whole result. Its writers then start a new file at
    /// each slice once they have written 8 MiB ([`super::files::Cuts`]): a later overwrite of some
    /// values rewrites the files of their slices, not files holding every value.
    pub async fn execute(&mut self) -> Result<(Vec<SendableRecordBatchStream>, usize), DeltaError> {
        let path = &self.target.path;
        let query = |e| DeltaError::query(path, e);
        let task = Arc::new(self.data.task_ctx());
        let plan = self
            .data
            .clone()
            .create_physical_plan()
            .await
            .map_err(query)?;
        let plan = without_final_sort(plan);
        if let Some(slices) = self.slices.as_ref().filter(|_| sliceable(&plan)) {
            match slices.predicates(&self.data) {
                Ok(predicates) => {
                    let count = predicates.len();
                    tracing::info!("{path}: computed in {count} slices of `{}`", slices.column);
                    let streams =
                        super::slices::execute_in_slices(path, &self.data, predicates).await?;
                    self.cuts = slices.cuts();
                    return Ok((streams, count));
                }
                // Slices only save memory: a result that cannot be cut is computed at once.
                Err(message) => tracing::warn!("{path}: computed at once: {message}"),
            }
        }
        let streams =
            datafusion::physical_plan::execute_stream_partitioned(plan, task).map_err(query)?;
        Ok((streams, 1))
    }

    /// Writes `streams` (from [`Replacement::execute`]) as the table's new files, uncommitted.
    pub async fn write(
        self,
        streams: Vec<SendableRecordBatchStream>,
    ) -> Result<Staged, DeltaError> {
        let target = self.target;
        let path = &target.path;
        let mut layout = super::files::Layout::unclustered(target.options.target_file_size);
        layout.partition_by = match &target.table {
            Some(table) => super::files::partition_columns(table),
            None => target.options.partition_by.clone(),
        };
        // A partitioned table's writer holds a file per partition: cutting them all at each slice
        // would make small files of partitions the slices do not follow.
        layout.cuts = self.cuts.filter(|_| layout.partition_by.is_empty());
        let written = super::files::write_new_files(
            path,
            target.table.as_ref(),
            &target.schema,
            &target.options,
            streams,
            &layout,
        )
        .await?;
        Ok(Staged { target, written })
    }
}

/// Whether `plan` is worth computing in slices, and may be: it holds rows or groups in memory, and
/// keeps no first rows (a `LIMIT` of each slice is not the `LIMIT` of the whole).
fn sliceable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    fn keeps_first_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
        plan.fetch().is_some() || plan.children().into_iter().any(keeps_first_rows)
    }
    holds_state(plan) && !keeps_first_rows(plan)
}

/// Whether running `plan` holds rows or groups in memory: an aggregation, a join, a sort or a window.
fn holds_state(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let stateful = plan.downcast_ref::<AggregateExec>().is_some()
        || plan.downcast_ref::<SortExec>().is_some()
        || plan.downcast_ref::<HashJoinExec>().is_some()
        || plan.downcast_ref::<SortMergeJoinExec>().is_some()
        || plan.downcast_ref::<NestedLoopJoinExec>().is_some()
        || plan.downcast_ref::<CrossJoinExec>().is_some()
        || plan.downcast_ref::<WindowAggExec>().is_some()
        || plan.downcast_ref::<BoundedWindowAggExec>().is_some();
    stateful || plan.children().into_iter().any(holds_state)
}

/// `plan` without the sort (and the merge of sorted partitions) at its top, unless it keeps only the
/// first rows: its partitions, unordered.
pub(super) fn without_final_sort(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    match plan.downcast_ref::<SortPreservingMergeExec>() {
        Some(merge) if merge.fetch().is_none() => without_sort(merge.input().clone()),
        _ => without_sort(plan),
    }
}

/// `plan` without its topmost sort, looked for under projections and filters (which keep no order of
/// their own).
fn without_sort(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if let Some(sort) = plan.downcast_ref::<SortExec>() {
        return match sort.fetch() {
            None => sort.input().clone(),
            Some(_) => plan,
        };
    }
    let passes_through = plan.downcast_ref::<ProjectionExec>().is_some()
        || plan.downcast_ref::<FilterExec>().is_some();
    let children = plan.children();
    if !passes_through || children.len() != 1 {
        return plan;
    }
    let child = children[0].clone();
    let stripped = without_sort(child.clone());
    if Arc::ptr_eq(&stripped, &child) {
        return plan;
    }
    datafusion::physical_plan::replace_children_if_necessary(plan.clone(), vec![stripped])
        .unwrap_or(plan)
}

/// A replacement's files, written and not yet committed.
pub struct Staged {
    target: Target,
    written: super::files::Written,
}

impl Staged {
    /// Publishes the new files in place of every file of the table, in one commit that conflicts with
    /// any commit made since the table was read.
    pub async fn commit(self, meta: &CommitMeta) -> Result<WriteMetrics, DeltaError> {
        let Target {
            path,
            table,
            schema,
            options,
        } = self.target;
        let table = match table {
            Some(table) => table,
            None => create_if_missing(&path, &schema, &options).await?,
        };
        let mut actions = super::files::remove_all(&path, &table)?;
        let files_added = self.written.adds.len() as u64;
        actions.extend(self.written.adds.into_iter().map(Action::Add));
        let operation = DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: (!options.partition_by.is_empty()).then_some(options.partition_by),
            predicate: None,
        };
        let version =
            super::files::commit(&path, &table, actions, operation, meta.properties()).await?;
        Ok(WriteMetrics {
            version: Some(version),
            rows_source: None,
            rows_written: self.written.rows,
            rows_inserted: self.written.rows,
            files_added,
            ..WriteMetrics::default()
        })
    }

    /// Deletes the written files: nothing is published.
    pub async fn discard(self) {
        let target = &self.target;
        super::files::discard_new(&target.path, target.table.as_ref(), &self.written.adds).await;
    }
}

/// Whether `table` holds a row for which `predicate` is not true. Files whose statistics show every
/// row inside are not read (a scope of every date the table holds costs no scan); the others are
/// read until one such row is found.
async fn holds_rows_outside(
    path: &Location,
    table: &deltalake::DeltaTable,
    predicate: &Expr,
) -> Result<bool, DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let has_files = table
        .snapshot()
        .map_or(true, |s| s.log_data().num_files() > 0);
    if !has_files {
        return Ok(false);
    }
    let ctx = super::session(None)?;
    let mut provider = super::provider(path, table).await?;
    // A row is outside when the predicate is false, or NULL, which a column NULL may make it.
    let maybe_outside = predicate
        .column_refs()
        .into_iter()
        .map(|column| Expr::Column(column.clone()).is_null())
        .fold(!predicate.clone(), Expr::or);
    match super::files_by_predicate(path, table, &maybe_outside, provider.schema()) {
        Ok(split) if split.cut.is_empty() => return Ok(false),
        Ok(split) if !split.whole.is_empty() => {
            if let Some(files) = super::files_provider(path, table, &split.cut).await? {
                provider = files;
            }
        }
        // Statistics are a shortcut: without them every file is read.
        _ => {}
    }
    let outside = ctx
        .read_table(provider)
        .map_err(query)?
        .filter(predicate.clone().is_not_true())
        .map_err(query)?
        .limit(0, Some(1))
        .map_err(query)?
        .count()
        .await
        .map_err(query)?;
    Ok(outside > 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(values: &[&str]) -> Scope {
        Scope {
            column: "d".into(),
            values: values.iter().map(|v| Some(v.to_string())).collect(),
        }
    }

    /// Overwrites `d` in `scope` with `(d, v)` rows; returns the table's rows and the commit's operation
    /// parameters (a replace-where names its predicate there).
    async fn overwrite_scoped(
        path: &Location,
        rows: &str,
        scope_values: &[&str],
    ) -> (Vec<String>, serde_json::Value) {
        use futures::StreamExt;
        let ctx = crate::delta::session(None).unwrap();
        let data = ctx
            .sql(&format!("SELECT * FROM (VALUES {rows}) AS t(d, v)"))
            .await
            .unwrap();
        let scope = (!scope_values.is_empty()).then(|| scope(scope_values));
        overwrite(
            path,
            data,
            &TableOptions::default(),
            &CommitMeta::default(),
            scope.as_ref(),
        )
        .await
        .unwrap();
        let table = crate::delta::open(path).await.unwrap().unwrap();
        let mut history = table.history(Some(1));
        let info = history.next().await.unwrap().unwrap();
        let ctx = crate::delta::session(None).unwrap();
        ctx.register_table("t", crate::delta::provider(path, &table).await.unwrap())
            .unwrap();
        let batches = ctx
            .sql("SELECT d || '=' || CAST(v AS VARCHAR) AS r FROM t ORDER BY d")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let rows = batches
            .iter()
            .flat_map(|b| {
                let strings =
                    datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                let strings = datafusion::arrow::array::AsArray::as_string::<i32>(&strings).clone();
                (0..b.num_rows())
                    .map(move |i| strings.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        let parameters = serde_json::to_value(&info.operation_parameters).unwrap_or_default();
        (rows, parameters)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scope_holding_every_row_replaces_the_table_and_a_smaller_one_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        overwrite_scoped(&path, "('a', 1), ('b', 1), ('c', 1)", &[]).await;
        // Every row is in the scope: the whole table is replaced, with no predicate.
        let (rows, parameters) = overwrite_scoped(
            &path,
            "('a', 2), ('b', 2), ('c', 2), ('x', 2)",
            &["a", "b", "c"],
        )
        .await;
        assert_eq!(
            rows,
            ["a=2", "b=2", "c=2"],
            "rows outside the scope are not written"
        );
        let predicate =
            |p: &serde_json::Value| p.get("predicate").filter(|v| !v.is_null()).cloned();
        assert_eq!(predicate(&parameters), None, "{parameters}");
        // Row `c` is outside the scope: a replace-where keeps it.
        let (rows, parameters) =
            overwrite_scoped(&path, "('a', 3), ('b', 3), ('c', 3)", &["a", "b"]).await;
        assert_eq!(rows, ["a=3", "b=3", "c=2"]);
        assert!(predicate(&parameters).is_some(), "{parameters}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_final_sort_is_not_run_unless_it_keeps_the_first_rows() {
        let ctx = crate::delta::session(None).unwrap();
        let sorts = |plan: &Arc<dyn ExecutionPlan>| {
            datafusion::physical_plan::displayable(plan.as_ref())
                .indent(false)
                .to_string()
                .contains("Sort")
        };
        let plan = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                ctx.sql(sql)
                    .await
                    .unwrap()
                    .create_physical_plan()
                    .await
                    .unwrap()
            }
        };
        let grouped = "SELECT v % 7 AS k, COUNT(*) AS n FROM generate_series(1, 1000) AS t(v) \
                       GROUP BY v % 7";
        let ordered = plan(Box::leak(format!("{grouped} ORDER BY k").into_boxed_str())).await;
        assert!(
            sorts(&ordered),
            "{}",
            datafusion::physical_plan::displayable(ordered.as_ref()).indent(false)
        );
        assert!(!sorts(&without_final_sort(ordered)));
        let first = plan(Box::leak(
            format!("{grouped} ORDER BY k LIMIT 3").into_boxed_str(),
        ))
        .await;
        assert!(sorts(&without_final_sort(first)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_plan_holding_state_and_no_limit_is_sliced() {
        let ctx = crate::delta::session(None).unwrap();
        let sliceable_sql = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let plan = ctx
                    .sql(sql)
                    .await
                    .unwrap()
                    .create_physical_plan()
                    .await
                    .unwrap();
                sliceable(&without_final_sort(plan))
            }
        };
        let rows = "SELECT v, v % 7 AS k FROM generate_series(1, 1000) AS t(v)";
        assert!(!sliceable_sql(Box::leak(format!("{rows} WHERE v > 3").into_boxed_str())).await);
        assert!(
            sliceable_sql(Box::leak(
                format!("SELECT k, COUNT(*) FROM ({rows}) GROUP BY k ORDER BY k").into_boxed_str()
            ))
            .await
        );
        assert!(
            !sliceable_sql(Box::leak(
                format!("SELECT k, COUNT(*) AS n FROM ({rows}) GROUP BY k ORDER BY n DESC LIMIT 2")
                    .into_boxed_str()
            ))
            .await
        );
    }

    /// A result computed in slices is written with their cuts; one computed at once (rows, no
    /// state to bound) without.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_computed_in_slices_is_written_cut_at_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::from(dir.path());
        let ctx = crate::delta::session(None).unwrap();
        let rows = "SELECT v % 100 AS k, v FROM generate_series(1, 10000) AS t(v)";
        let grouped = ctx
            .sql(&format!("SELECT k, COUNT(*) AS n FROM ({rows}) GROUP BY k"))
            .await
            .unwrap();
        let slices = Some(Slices::at("k", &["30", "60"]));
        let options = TableOptions::default();
        let mut replacement = Replacement::plan(&path, grouped, &options, None, slices.clone())
            .await
            .unwrap()
            .unwrap();
        let (streams, count) = replacement.execute().await.unwrap();
        assert_eq!(count, 3);
        let cuts = replacement.cuts.as_ref().expect("cut at the slices");
        assert_eq!(
            (cuts.column.as_str(), cuts.bounds.as_slice()),
            ("k", &[30, 60][..])
        );
        let staged = replacement.write(streams).await.unwrap();
        assert_eq!(staged.written.rows, 100);
        staged.commit(&CommitMeta::default()).await.unwrap();
        let plain = ctx
            .sql(&format!("SELECT k, v AS n FROM ({rows})"))
            .await
            .unwrap();
        let mut at_once = Replacement::plan(&path, plain, &options, None, slices)
            .await
            .unwrap()
            .unwrap();
        let (_, count) = at_once.execute().await.unwrap();
        assert_eq!(count, 1);
        assert!(at_once.cuts.is_none());
    }

    #[tokio::test]
    async fn rows_outside_a_scope_are_looked_for_only_in_files_whose_statistics_allow_them() {
        use datafusion::arrow::{
            array::{Int64Array, RecordBatch},
            datatypes::{DataType, Field, Schema},
        };
        let dir = tempfile::tempdir().unwrap();
        let path = Location::local(dir.path().join("t"));
        // Three files: `d` 1–10, 11–30, and one NULL.
        let schema = Arc::new(Schema::new(vec![Field::new("d", DataType::Int64, true)]));
        for values in [
            (1..=10).map(Some).collect::<Vec<_>>(),
            (11..=30).map(Some).collect(),
            vec![None],
        ] {
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values))])
                    .unwrap();
            super::super::append_batches(
                &path,
                vec![batch],
                &TableOptions::default(),
                &CommitMeta::default(),
            )
            .await
            .unwrap();
        }
        let table = super::super::open(&path).await.unwrap().unwrap();
        let holds_outside = |values: std::ops::RangeInclusive<i64>, null: bool| {
            let (path, table) = (path.clone(), table.clone());
            async move {
                let mut values: BTreeSet<Option<String>> =
                    values.map(|v| Some(v.to_string())).collect();
                if null {
                    values.insert(None);
                }
                let scope = Scope {
                    column: "d".into(),
                    values,
                };
                let ctx = super::super::session(None).unwrap();
                let frame = ctx
                    .read_table(super::super::provider(&path, &table).await.unwrap())
                    .unwrap();
                holds_rows_outside(&path, &table, &scope.predicate(&frame).unwrap()).await
            }
        };
        assert!(holds_outside(1..=30, false).await.unwrap(), "the NULL row");
        assert!(!holds_outside(1..=30, true).await.unwrap());
        assert!(holds_outside(1..=15, true).await.unwrap());
        // The file of 1–10 broken: a scope its statistics show it inside never reads it.
        let first = std::fs::read_dir(dir.path().join("t"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .find(|p| {
                let file = std::fs::File::open(p).unwrap();
                let reader =
                    datafusion::parquet::file::reader::SerializedFileReader::new(file).unwrap();
                use datafusion::parquet::file::reader::FileReader;
                reader.metadata().file_metadata().num_rows() == 10
            })
            .unwrap();
        std::fs::write(&first, b"not parquet").unwrap();
        assert!(!holds_outside(0..=40, true).await.unwrap());
        assert!(holds_outside(5..=15, true).await.is_err(), "it is read");
        assert!(holds_outside(1..=15, true).await.unwrap());
    }

    #[test]
    fn consecutive_dates_and_integers_become_ranges() {
        let dates = scope(&[
            "2019-01-01",
            "2019-01-02",
            "2019-01-03",
            "2019-01-05",
            "2018-12-31",
        ]);
        assert_eq!(
            dates.sql(&DataType::Date32),
            "(\"d\" IN ('2019-01-05') OR \"d\" BETWEEN '2018-12-31' AND '2019-01-03')"
        );
        // 10 sorts before 9 as text; as integers 8, 9, 10 are one run.
        let ints = scope(&["10", "9", "8", "12"]);
        assert_eq!(
            ints.sql(&DataType::Int64),
            "(\"d\" IN ('12') OR \"d\" BETWEEN '8' AND '10')"
        );
        // Strings are never ranges: 'a' to 'c' holds more than a, b and c.
        let text = scope(&["a", "b", "c"]);
        assert_eq!(text.sql(&DataType::Utf8), "(\"d\" IN ('a', 'b', 'c'))");
    }

    #[test]
    fn ten_years_of_dates_is_one_term() {
        let start = chrono::NaiveDate::from_ymd_opt(2010, 1, 1).expect("date");
        let days: Vec<String> = (0..3650)
            .map(|i| (start + chrono::Duration::days(i)).to_string())
            .collect();
        let all = scope(&days.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(all.terms(&DataType::Date32).len(), 1);
        // Every other day: no runs, too many terms for a predicate.
        let sparse: Vec<&str> = days.iter().step_by(2).map(String::as_str).collect();
        assert!(scope(&sparse).terms(&DataType::Date32).len() > MAX_SCOPE_TERMS);
    }

    #[test]
    fn many_terms_make_a_shallow_predicate() {
        let many: Vec<Expr> = (0..4096).map(|i| col("x").eq(lit(i))).collect();
        fn depth(expr: &Expr) -> usize {
            match expr {
                Expr::BinaryExpr(b) => 1 + depth(&b.left).max(depth(&b.right)),
                _ => 0,
            }
        }
        assert!(depth(&any_of(many)) <= 14);
    }
}
