//! Check queries that aggregate a lake table as a whole (`SELECT COALESCE(SUM(amount), 0) FROM
//! silver.transactions`), answered from each of its files' partial aggregates, remembered between
//! runs under `<lake>/_medallion/partials/`.
//!
//! A Delta file never changes once written, and a deletion vector is a file of its own: a file's
//! partial (its `SUM`, `COUNT`, `MIN`, `MAX` under the query's filters) holds for as long as the file
//! is live with the same vector. A run then reads only the files written since the last one, and a
//! reconciliation of Gold with Silver costs what the batch costs, not what Silver costs.
//!
//! Only an aggregate without `GROUP BY`, whose functions combine from their partials (`SUM`, `COUNT`,
//! `MIN` and `MAX`, not `DISTINCT`), over filters and projections of one lake table read whole, is
//! answered so; any other part of a query runs as it is. A count of all rows alone is left to
//! DataFusion, which answers it from the log's row counts.

use std::{
    collections::{HashMap, HashSet},
    io::Cursor,
    sync::Arc,
};

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array},
        compute::{cast, concat_batches, take_record_batch},
        datatypes::{DataType, Field, Int64Type, Schema, SchemaRef},
        ipc::{reader::FileReader, writer::FileWriter},
    },
    catalog::TableProvider,
    common::{
        Column, DFSchemaRef,
        tree_node::{Transformed, TreeNode, TreeNodeRecursion},
    },
    datasource::{MemTable, provider_as_source, source_as_provider},
    error::{DataFusionError, Result},
    functions::expr_fn::coalesce,
    functions_aggregate::expr_fn::{max, min, sum},
    logical_expr::{
        Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, Union, cast as cast_expr, lit,
        utils::split_conjunction,
    },
    prelude::SessionContext,
};
use deltalake::DeltaTable;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use tracing::{debug, warn};

use crate::{delta, storage::Location};

/// Bumped when what a partial holds or how it is keyed changes: older partials are then not read.
const FORMAT: &str = "medallion-partials-1";
/// Files whose partials one query computes.
const FILES_PER_QUERY: usize = 32;
/// Partials not used for this long are deleted when a query's are first kept.
const UNUSED_DAYS: i64 = 7;
/// The column of a computed partial that tells which file it is of.
const FILE_INDEX: &str = "__medallion_file";

/// A lake table as a stage's checks read it.
struct LakeTable {
    path: Location,
    table: DeltaTable,
    /// The provider registered for the table: a scan of anything else (a filtered view, another
    /// version) is not answered from partials.
    provider: Arc<dyn TableProvider>,
    /// The files (scan ids) the provider reads, when not all of the table's.
    only: Option<HashSet<String>>,
}

/// The lake tables a stage's checks can read from partials, and where partials are kept.
#[derive(Default)]
pub struct Partials {
    /// `None`: partials are computed but not kept.
    folder: Option<Location>,
    tables: HashMap<String, LakeTable>,
}

/// Where the checks of the pipelines of `lake` keep their partials.
pub fn folder(lake: &Location) -> Location {
    lake.join("_medallion/partials")
}

impl Partials {
    /// Partials kept in `folder` ([`folder`] of the lake).
    pub fn new(folder: Location) -> Partials {
        Partials {
            folder: Some(folder),
            tables: HashMap::new(),
        }
    }

    /// `table` at `path` is registered in the checks' session as `name` (`layer.table`) by `provider`.
    pub fn add(
        &mut self,
        name: &str,
        path: &Location,
        table: &DeltaTable,
        provider: Arc<dyn TableProvider>,
    ) {
        self.tables.insert(
            name.to_string(),
            LakeTable {
                path: path.clone(),
                table: table.clone(),
                provider,
                only: None,
            },
        );
    }

    /// As [`Self::add`], for a provider reading only the files `ids` (scan ids) of `table`.
    pub fn add_files(
        &mut self,
        name: &str,
        path: &Location,
        table: &DeltaTable,
        provider: Arc<dyn TableProvider>,
        ids: &[String],
    ) {
        self.add(name, path, table, provider);
        if let Some(added) = self.tables.get_mut(name) {
            added.only = Some(ids.iter().cloned().collect());
        }
    }

    fn table_of(&self, scan: &datafusion::logical_expr::TableScan) -> Option<&LakeTable> {
        let table = self.tables.get(&scan.table_name.to_string())?;
        let source = source_as_provider(&scan.source).ok()?;
        std::ptr::addr_eq(Arc::as_ptr(&source), Arc::as_ptr(&table.provider)).then_some(table)
    }
}

/// `plan` (of `sql`, optimized) with each aggregate that [`Partials`] can answer replaced by the combination of
/// its files' partials; `None` when it has none.
pub async fn rewrite(
    ctx: &SessionContext,
    sql: &str,
    plan: &LogicalPlan,
    partials: &Partials,
) -> Result<Option<LogicalPlan>> {
    tracing::trace!("optimized plan:\n{}", plan.display_indent());
    let mut found = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Aggregate(aggregate) = node
            && let Some(parts) = parts(aggregate, partials)
        {
            found.push((aggregate.clone(), parts));
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut answers = Vec::new();
    for (aggregate, parts) in found {
        if let Some(answer) =
            combined(ctx, sql, &aggregate, &parts, partials.folder.as_ref()).await?
        {
            answers.push((LogicalPlan::Aggregate(aggregate), answer));
        }
    }
    if answers.is_empty() {
        return Ok(None);
    }
    let rewritten = plan.clone().transform_up_with_subqueries(|node| {
        match answers.iter().find(|(aggregate, _)| *aggregate == node) {
            Some((_, answer)) => Ok(Transformed::yes(answer.clone())),
            None => Ok(Transformed::no(node)),
        }
    })?;
    Ok(Some(rewritten.data))
}

/// One part of an aggregate's input, whose partials combine with the others'.
enum Part<'a> {
    /// Filters and projections of a lake table: one partial per file, kept between runs.
    Files(Aggregate, &'a LakeTable),
    /// Anything else: one partial, computed each time.
    Whole(Aggregate),
}

/// How [`Partials`] answers `aggregate`: over one lake table, or over a `UNION ALL` of which some
/// branches are lake tables (a stage's `candidate`: the target's files the batch leaves alone, the
/// rest of the target less what is recomputed, and the batch); `None` if it does not.
fn parts<'a>(aggregate: &Aggregate, partials: &'a Partials) -> Option<Vec<Part<'a>>> {
    let (filtered, counts_only) = combines(aggregate)?;
    let mut below = aggregate.input.as_ref();
    while let LogicalPlan::SubqueryAlias(alias) = below {
        below = alias.input.as_ref();
    }
    let LogicalPlan::Union(union) = below else {
        let table = answerable(aggregate, partials, filtered, counts_only)?;
        return Some(vec![Part::Files(aggregate.clone(), table)]);
    };
    let mut parts = Vec::new();
    for branch in &union.inputs {
        // The union's columns (under any alias) are its branches' columns, in order.
        let columns: HashMap<Column, Expr> = aggregate
            .input
            .schema()
            .columns()
            .into_iter()
            .zip(branch.schema().columns())
            .map(|(outer, inner)| (outer, Expr::Column(inner)))
            .collect();
        let exprs = aggregate
            .aggr_expr
            .iter()
            .map(|expr| {
                expr.clone()
                    .transform(|e| match e {
                        Expr::Column(column) => match columns.get(&column) {
                            Some(inner) => Ok(Transformed::yes(inner.clone())),
                            None => Ok(Transformed::no(Expr::Column(column))),
                        },
                        other => Ok(Transformed::no(other)),
                    })
                    .map(|t| t.data)
            })
            .collect::<Result<Vec<_>>>()
            .ok()?;
        let of_branch = Aggregate::try_new(branch.clone(), vec![], exprs).ok()?;
        let (filtered, counts_only) = combines(&of_branch)?;
        // Only a branch of a target's files read whole: the others (the rest of the target less
        // the values recomputed, the batch) are filtered by what this run recomputes, and their
        // partials would be kept for that run alone.
        let table = answerable(&of_branch, partials, filtered, counts_only)
            .filter(|table| table.only.is_some());
        parts.push(match table {
            Some(table) => Part::Files(of_branch, table),
            None => Part::Whole(of_branch),
        });
    }
    parts
        .iter()
        .any(|part| matches!(part, Part::Files(..)))
        .then_some(parts)
}

/// Whether `aggregate`'s functions combine from partials: then whether one filters its rows, and
/// whether all count every row.
fn combines(aggregate: &Aggregate) -> Option<(bool, bool)> {
    if !aggregate.group_expr.is_empty() {
        return None;
    }
    let mut filtered = false;
    let mut counts_only = true;
    for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
        let Expr::AggregateFunction(function) = strip_alias(expr) else {
            return None;
        };
        let params = &function.params;
        let name = function.func.name();
        // A sum of floats depends on the order it adds in: its partials would not give the query's.
        let floating = aggregate
            .schema
            .fields()
            .get(aggregate.group_expr.len() + i)
            .is_none_or(|field| field.data_type().is_floating());
        let combines = matches!(name, "count" | "min" | "max") || (name == "sum" && !floating);
        if !combines
            || params.distinct
            || !params.order_by.is_empty()
            || params.null_treatment.is_some()
            || expr.is_volatile()
        {
            return None;
        }
        filtered |= params.filter.is_some();
        counts_only &=
            name == "count" && params.args.iter().all(|a| matches!(a, Expr::Literal(..)));
    }
    Some((filtered, counts_only))
}

/// The lake table whose files' partials answer `aggregate` (whose functions combine), if its input
/// is filters and projections of one.
fn answerable<'a>(
    aggregate: &Aggregate,
    partials: &'a Partials,
    mut filtered: bool,
    counts_only: bool,
) -> Option<&'a LakeTable> {
    let mut node = aggregate.input.as_ref();
    loop {
        match node {
            LogicalPlan::Projection(projection) => {
                if projection.expr.iter().any(Expr::is_volatile) {
                    return None;
                }
                node = projection.input.as_ref();
            }
            LogicalPlan::Filter(filter) => {
                if filter.predicate.is_volatile() {
                    return None;
                }
                filtered = true;
                node = filter.input.as_ref();
            }
            LogicalPlan::SubqueryAlias(alias) => node = alias.input.as_ref(),
            LogicalPlan::TableScan(scan) => {
                if scan.fetch.is_some() || scan.filters.iter().any(Expr::is_volatile) {
                    return None;
                }
                filtered |= !scan.filters.is_empty();
                // The log's row counts answer a count of every row.
                if counts_only && !filtered {
                    return None;
                }
                return partials.table_of(scan);
            }
            _ => return None,
        }
    }
}

fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => strip_alias(&alias.expr),
        other => other,
    }
}

/// The plan that combines the partials of `aggregate`'s `parts`, with `aggregate`'s schema; `None`
/// when a file cannot be read alone.
async fn combined(
    ctx: &SessionContext,
    sql: &str,
    aggregate: &Aggregate,
    parts: &[Part<'_>],
    folder: Option<&Location>,
) -> Result<Option<LogicalPlan>> {
    let layout = Layout::of(aggregate);
    let mut rows = Vec::new();
    for part in parts {
        match part {
            Part::Files(of_files, table) => {
                match file_partials(ctx, sql, of_files, table, folder, &layout).await? {
                    Some(batch) => rows.push(batch),
                    None => return Ok(None),
                }
            }
            Part::Whole(whole) => rows.push(whole_partial(ctx, whole, &layout).await?),
        }
    }
    layout
        .combine(concat_batches(&layout.stored, &rows)?)
        .map(Some)
}

/// The partials of `aggregate` over each of `table`'s files, those kept read and the others
/// computed (and then kept), as rows of [`Layout::stored`]; `None` when a file cannot be read alone.
async fn file_partials(
    ctx: &SessionContext,
    sql: &str,
    aggregate: &Aggregate,
    table: &LakeTable,
    folder: Option<&Location>,
    layout: &Layout,
) -> Result<Option<RecordBatch>> {
    let delta_err = |e: delta::DeltaError| DataFusionError::External(Box::new(e));
    let live = delta::live_files(&table.path, &table.table).map_err(delta_err)?;
    let key = key(sql, aggregate, table);
    let store = folder.and_then(|folder| match folder.store() {
        Ok(store) => Some((store, Path::from(format!("{key}.arrow")))),
        Err(error) => {
            warn!(%folder, "partial aggregates not kept: {error}");
            None
        }
    });
    let kept = match &store {
        Some((store, path)) => read(store.as_ref(), path, &layout.stored).await,
        None => None,
    };
    let mut known: HashMap<(&str, Option<&str>), u32> = HashMap::new();
    if let Some(kept) = &kept {
        let ids = kept.column(0).as_string::<i32>();
        let vectors = kept.column(1).as_string::<i32>();
        for row in 0..kept.num_rows() {
            let vector = (!vectors.is_null(row)).then(|| vectors.value(row));
            known.insert((ids.value(row), vector), row as u32);
        }
    }
    // Partials of live files are kept, those read or not; the files read are the provider's.
    let mut retained = Vec::new();
    let mut reused = Vec::new();
    let mut missing = Vec::new();
    for file in &live {
        let read = table
            .only
            .as_ref()
            .is_none_or(|only| only.contains(&file.id));
        match known.get(&(file.id.as_str(), file.vector.as_deref())) {
            Some(row) => {
                retained.push(*row);
                if read {
                    reused.push(*row);
                }
            }
            None if read => missing.push(file),
            None => {}
        }
    }
    let mut computed = Vec::new();
    for chunk in missing.chunks(FILES_PER_QUERY) {
        match computed_partials(ctx, aggregate, table, chunk, layout).await? {
            Some(batch) => computed.push(batch),
            None => return Ok(None),
        }
    }
    let computed = concat_batches(&layout.stored, &computed)?;
    debug!(
        table = %table.path,
        files = live.len(),
        read = reused.len() + missing.len(),
        computed = missing.len(),
        "aggregate answered from its files' partials"
    );
    let (reused, retained) = match &kept {
        Some(kept) => (
            take_record_batch(kept, &UInt32Array::from(reused))?,
            take_record_batch(kept, &UInt32Array::from(retained.clone()))?,
        ),
        None => (
            RecordBatch::new_empty(layout.stored.clone()),
            RecordBatch::new_empty(layout.stored.clone()),
        ),
    };
    // Kept again even unchanged: its time is when it was last used (see `sweep`).
    if let Some((store, path)) = &store {
        let all = concat_batches(&layout.stored, &[retained, computed.clone()])?;
        write(store.as_ref(), path, &all).await;
        if kept.is_none() {
            sweep(store.as_ref()).await;
        }
    }
    Ok(Some(concat_batches(&layout.stored, &[reused, computed])?))
}

/// `aggregate` computed over its whole input, as one row of [`Layout::stored`] (of no file).
async fn whole_partial(
    ctx: &SessionContext,
    aggregate: &Aggregate,
    layout: &Layout,
) -> Result<RecordBatch> {
    let plan = LogicalPlan::Aggregate(aggregate.clone());
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(aggregate.schema.as_arrow().clone()));
    let batch = concat_batches(&schema, &batches)?;
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..batch.num_rows()).map(|_| ""),
        )),
        Arc::new(StringArray::new_null(batch.num_rows())),
    ];
    for (i, field) in layout.stored.fields().iter().enumerate().skip(2) {
        columns.push(cast(batch.column(i - 2), field.data_type())?);
    }
    Ok(RecordBatch::try_new(layout.stored.clone(), columns)?)
}

/// Where a partial is kept: the query's text, the aggregate (its functions, their filters and output),
/// what lies between it and the scan (each filter's terms, each computed column) and the table's path
/// and schema, hashed. Not the plan as printed: a filter the scan takes whole is planned without its
/// `Filter` and with fewer columns (a table with deletion vectors is read by another provider), and
/// the partial is the same.
fn key(sql: &str, aggregate: &Aggregate, table: &LakeTable) -> String {
    let mut terms = std::collections::BTreeSet::new();
    let mut computed = std::collections::BTreeSet::new();
    let _ = aggregate.input.apply(|node| {
        match node {
            LogicalPlan::Filter(filter) => {
                terms.extend(
                    split_conjunction(&filter.predicate)
                        .iter()
                        .map(|t| t.to_string()),
                );
            }
            LogicalPlan::TableScan(scan) => {
                for filter in &scan.filters {
                    terms.extend(split_conjunction(filter).iter().map(|t| t.to_string()));
                }
            }
            // A column passed on as it is depends on the plan's shape, not on what is summed; a
            // column renamed does not.
            LogicalPlan::Projection(projection) => computed.extend(
                projection
                    .expr
                    .iter()
                    .filter(|e| !matches!(e, Expr::Column(_)))
                    .map(|e| format!("{e} AS {}", e.schema_name())),
            ),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let output: Vec<String> = aggregate
        .schema
        .iter()
        .map(|(qualifier, field)| format!("{qualifier:?}.{}: {}", field.name(), field.data_type()))
        .collect();
    let functions: Vec<String> = aggregate.aggr_expr.iter().map(|e| e.to_string()).collect();
    let mut hasher = blake3::Hasher::new();
    for part in [
        FORMAT.to_string(),
        table.path.to_string(),
        format!("{:?}", table.provider.schema()),
        sql.to_string(),
        format!("{output:?}"),
        format!("{functions:?}"),
        format!("{terms:?}"),
        format!("{computed:?}"),
    ] {
        hasher.update(part.as_bytes());
        hasher.update(&[0]);
    }
    hasher.finalize().to_hex().to_string()
}

/// How an aggregate's partials are stored and combined.
struct Layout {
    /// The aggregate's output schema.
    output: DFSchemaRef,
    /// Each partial's file id, its vector, then one column per aggregate function (`p0`, `p1`, ...).
    stored: SchemaRef,
    /// Each function's name (`sum`, `count`, `min`, `max`).
    functions: Vec<String>,
}

impl Layout {
    fn of(aggregate: &Aggregate) -> Layout {
        let mut fields = vec![
            Field::new("file", DataType::Utf8, false),
            Field::new("vector", DataType::Utf8, true),
        ];
        let mut functions = Vec::new();
        for (i, field) in aggregate.schema.fields().iter().enumerate() {
            fields.push(Field::new(format!("p{i}"), field.data_type().clone(), true));
        }
        for expr in &aggregate.aggr_expr {
            if let Expr::AggregateFunction(function) = strip_alias(expr) {
                functions.push(function.func.name().to_string());
            }
        }
        Layout {
            output: aggregate.schema.clone(),
            stored: Arc::new(Schema::new(fields)),
            functions,
        }
    }

    /// The plan combining the partials in `all` (of [`Self::stored`]) into the aggregate's output.
    fn combine(&self, all: RecordBatch) -> Result<LogicalPlan> {
        let values = all.project(&(2..all.num_columns()).collect::<Vec<_>>())?;
        let table = MemTable::try_new(values.schema(), vec![vec![values]])?;
        let mut combine = Vec::new();
        let mut outputs = Vec::new();
        for (i, function) in self.functions.iter().enumerate() {
            let partial = Expr::Column(Column::from_name(format!("p{i}")));
            let combined = match function.as_str() {
                "min" => min(partial),
                "max" => max(partial),
                // A count's partials add up; a sum's too (NULL when every file's is).
                _ => sum(partial),
            };
            combine.push(combined.alias(format!("c{i}")));
            let (qualifier, field) = self.output.qualified_field(i);
            let value = Expr::Column(Column::from_name(format!("c{i}")));
            let value = match function.as_str() {
                "count" => coalesce(vec![value, lit(0i64)]),
                _ => value,
            };
            outputs.push(
                cast_expr(value, field.data_type().clone())
                    .alias_qualified(qualifier.cloned(), field.name()),
            );
        }
        LogicalPlanBuilder::scan(
            "__medallion_partials",
            provider_as_source(Arc::new(table)),
            None,
        )?
        .aggregate(Vec::<Expr>::new(), combine)?
        .project(outputs)?
        .build()
    }
}

/// The partials of `aggregate` over the files `chunk` of `table`, each file read alone, as rows of
/// [`Layout::stored`]; `None` when a file cannot be read alone.
async fn computed_partials(
    ctx: &SessionContext,
    aggregate: &Aggregate,
    table: &LakeTable,
    chunk: &[&delta::LiveFile],
    layout: &Layout,
) -> Result<Option<RecordBatch>> {
    let mut branches = Vec::new();
    for (index, file) in chunk.iter().enumerate() {
        let provider =
            delta::files_provider(&table.path, &table.table, std::slice::from_ref(&file.id))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let Some(provider) = provider else {
            return Ok(None);
        };
        if provider.schema() != table.provider.schema() {
            return Ok(None);
        }
        let source = provider_as_source(provider);
        let of_file = LogicalPlan::Aggregate(aggregate.clone())
            .transform_up(|node| match node {
                LogicalPlan::TableScan(scan) => {
                    let scan = datafusion::logical_expr::TableScan {
                        source: source.clone(),
                        ..scan
                    };
                    Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                }
                other => Ok(Transformed::no(other)),
            })?
            .data;
        let mut columns = vec![lit(index as i64).alias(FILE_INDEX)];
        for (i, (qualifier, field)) in aggregate.schema.iter().enumerate() {
            columns.push(Expr::Column(Column::from((qualifier, field))).alias(format!("p{i}")));
        }
        branches.push(Arc::new(
            LogicalPlanBuilder::from(of_file)
                .project(columns)?
                .build()?,
        ));
    }
    let Some(first) = branches.first() else {
        return Ok(Some(RecordBatch::new_empty(layout.stored.clone())));
    };
    let plan = match branches.len() {
        1 => first.as_ref().clone(),
        _ => LogicalPlan::Union(Union {
            schema: first.schema().clone(),
            inputs: branches,
        }),
    };
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
    let mut rows = Vec::new();
    for batch in &batches {
        let indexes = cast(batch.column(0), &DataType::Int64)?;
        let indexes = indexes.as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            rows.push((indexes.value(row) as usize, batch.slice(row, 1)));
        }
    }
    rows.sort_by_key(|(index, _)| *index);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(i, _)| chunk[*i].id.as_str()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|(i, _)| chunk[*i].vector.as_deref()),
        )),
    ];
    for (i, field) in layout.stored.fields().iter().enumerate().skip(2) {
        let values: Vec<ArrayRef> = rows
            .iter()
            .map(|(_, row)| row.column(i - 1).clone())
            .collect();
        let values: Vec<&dyn Array> = values.iter().map(|v| v.as_ref()).collect();
        let joined = datafusion::arrow::compute::concat(&values)?;
        columns.push(cast(&joined, field.data_type())?);
    }
    Ok(Some(RecordBatch::try_new(layout.stored.clone(), columns)?))
}

/// The partials kept at `path`, if they are there and of `schema`; a partial that cannot be read is
/// computed again.
async fn read(store: &dyn ObjectStore, path: &Path, schema: &SchemaRef) -> Option<RecordBatch> {
    let bytes = match store.get(path).await {
        Ok(got) => got.bytes().await,
        Err(object_store::Error::NotFound { .. }) => return None,
        Err(error) => Err(error),
    };
    let parsed = bytes.map_err(|e| e.to_string()).and_then(|bytes| {
        let reader = FileReader::try_new(Cursor::new(bytes), None).map_err(|e| e.to_string())?;
        if reader.schema() != *schema {
            return Ok(None);
        }
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        concat_batches(schema, &batches)
            .map(Some)
            .map_err(|e| e.to_string())
    });
    match parsed {
        Ok(batch) => batch,
        Err(error) => {
            warn!(%path, "partial aggregates unreadable, computed again: {error}");
            None
        }
    }
}

/// Deletes the partials no query used for [`UNUSED_DAYS`]: those of a check changed or removed, of a
/// table gone, or of a filter that named one run's values. Run when a query's partials are first
/// kept, so it costs a listing of the folder then only. A failure leaves them for the next time.
async fn sweep(store: &dyn ObjectStore) {
    if let Err(error) = delete_unused(store, false).await {
        debug!("partial aggregates not swept: {error}");
    }
}

/// What [`sweep_folder`] found in the partials folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Files of partials in the folder before the sweep.
    pub files: u64,
    /// Those no query used for [`UNUSED_DAYS`]: deleted, unless in a dry run.
    pub unused: u64,
    /// Those of `unused` that could not be deleted (each logged): left for the next sweep.
    pub failed: u64,
}

/// The sweep of `folder` (`<lake>/_medallion/partials`) that runs do when a query's partials are
/// first kept, for `medallion maintain --vacuum`, which a lake whose checks never change would
/// otherwise never have; with `dry_run`, unused partials are counted and left. A folder not there yet
/// holds none (and is not made). An error is the folder's listing's.
pub async fn sweep_folder(folder: &Location, dry_run: bool) -> Result<Swept, String> {
    if folder.local_path().is_some_and(|dir| !dir.exists()) {
        return Ok(Swept::default());
    }
    let store = folder.store().map_err(|e| e.to_string())?;
    delete_unused(store.as_ref(), dry_run)
        .await
        .map_err(|e| format!("cannot list `{folder}`: {e}"))
}

/// Lists `store` and deletes (unless `dry_run`) what was last written more than [`UNUSED_DAYS`] ago.
/// A partial is written again whenever a query uses it, so its time is when it was last used. A
/// partial that cannot be deleted is logged and left; a failed listing is the error.
async fn delete_unused(store: &dyn ObjectStore, dry_run: bool) -> object_store::Result<Swept> {
    use futures::StreamExt;
    let cutoff = chrono::Utc::now() - chrono::Duration::days(UNUSED_DAYS);
    let mut swept = Swept::default();
    let mut listed = store.list(None);
    while let Some(entry) = listed.next().await {
        let meta = entry?;
        swept.files += 1;
        if meta.last_modified >= cutoff {
            continue;
        }
        swept.unused += 1;
        if dry_run {
            continue;
        }
        match store.delete(&meta.location).await {
            // Another sweep got there first.
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => {
                swept.failed += 1;
                warn!(path = %meta.location, "unused partial aggregates not deleted: {error}");
            }
        }
    }
    Ok(swept)
}

/// Keeps `all` at `path`, in one put (a reader sees the old file or the new one). A failure costs
/// the next run the files' reads again, no more.
async fn write(store: &dyn ObjectStore, path: &Path, all: &RecordBatch) {
    let encoded = (|| {
        let mut buffer = Vec::new();
        let mut writer = FileWriter::try_new(&mut buffer, &all.schema())?;
        writer.write(all)?;
        writer.finish()?;
        drop(writer);
        Ok::<_, datafusion::arrow::error::ArrowError>(buffer)
    })();
    let result = match encoded {
        Ok(buffer) => store
            .put(path, PutPayload::from(buffer))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = result {
        warn!(%path, "partial aggregates not kept: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::{
        array::{Decimal128Array, Int64Array},
        datatypes::Decimal128Type,
        util::pretty::pretty_format_batches,
    };

    use crate::{config::TableName, delta::TableOptions};

    /// Appends one file of [`rows`].
    async fn append(path: &Location, keys: std::ops::Range<i64>) {
        delta::append_batches(
            path,
            vec![rows(keys)],
            &TableOptions::default(),
            &Default::default(),
        )
        .await
        .unwrap();
    }

    /// Keys `keys`, each with amount `k - 5` (`-5.00` for 0).
    fn rows(keys: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("amount", DataType::Decimal128(18, 2), true),
        ]));
        let amounts =
            Decimal128Array::from_iter_values(keys.clone().map(|k| i128::from(k - 5) * 100))
                .with_precision_and_scale(18, 2)
                .unwrap();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(keys)),
                Arc::new(amounts),
            ],
        )
        .unwrap()
    }

    /// `sql` over `silver.t` at `path` in a new session (a new run), answered with the partials in
    /// `folder` and as it is: both results as text, and whether partials answered it.
    async fn answer(path: &Location, folder: &Location, sql: &str) -> (String, String, bool) {
        let table = delta::open(path).await.unwrap().unwrap();
        let provider = delta::provider(path, &table).await.unwrap();
        let ctx = delta::session(None).unwrap();
        let name = TableName::parse("silver.t").unwrap();
        crate::engine::register_table(&ctx, &name, provider.clone(), None).unwrap();
        let mut partials = Partials::new(folder.clone());
        partials.add("silver.t", path, &table, provider);
        // Not a lake table: `other`; the table's first file alone: `first`.
        let other = MemTable::try_new(rows(0..1).schema(), vec![vec![rows(-2..3)]]).unwrap();
        ctx.register_table("other", Arc::new(other)).unwrap();
        let files = delta::live_files(path, &table).unwrap();
        let first = [files[0].id.clone()];
        let first_file = delta::files_provider(path, &table, &first)
            .await
            .unwrap()
            .unwrap();
        ctx.register_table("first", first_file.clone()).unwrap();
        partials.add_files("first", path, &table, first_file, &first);
        let frame = ctx.sql(sql).await.unwrap();
        let plain = pretty_format_batches(&frame.clone().collect().await.unwrap())
            .unwrap()
            .to_string();
        let plan = frame.into_optimized_plan().unwrap();
        let Some(rewritten) = rewrite(&ctx, sql, &plan, &partials).await.unwrap() else {
            return (plain.clone(), plain, false);
        };
        let batches = ctx
            .execute_logical_plan(rewritten)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        (
            pretty_format_batches(&batches).unwrap().to_string(),
            plain,
            true,
        )
    }

    /// The one file of partials in `folder`.
    fn kept(folder: &std::path::Path) -> (std::path::PathBuf, RecordBatch) {
        let files: Vec<_> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let reader = FileReader::try_new(std::fs::File::open(&files[0]).unwrap(), None).unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        let batch = concat_batches(&batches[0].schema(), &batches).unwrap();
        (files[0].clone(), batch)
    }

    /// A table `t` of two files, `first` and `second` (see [`append`]), and a folder for partials.
    async fn two_files(
        first: std::ops::Range<i64>,
        second: std::ops::Range<i64>,
    ) -> (tempfile::TempDir, Location, Location) {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::local(dir.path().join("t"));
        let folder = Location::local(dir.path().join("partials"));
        append(&path, first).await;
        append(&path, second).await;
        (dir, path, folder)
    }

    const REFUNDS: &str = "SELECT COALESCE(-SUM(amount), 0) AS refunds, COUNT(*) AS n, MIN(k), \
                           MAX(amount) FROM silver.t WHERE amount < 0";

    #[tokio::test]
    async fn an_aggregate_over_a_whole_table_reads_only_the_files_it_has_no_partial_of() {
        let (dir, path, folder) = two_files(0..10, 10..20).await;

        let (answered, plain, rewritten) = answer(&path, &folder, REFUNDS).await;
        assert!(rewritten);
        assert_eq!(answered, plain);
        assert!(answered.contains("| 15.00   | 5 | 0"), "{answered}");
        let (file, partials) = kept(&dir.path().join("partials"));
        assert_eq!(partials.num_rows(), 2);

        // A partial kept is what the next run reads for its file: the one file with refunds, its sum
        // made 1.00 larger, shows.
        let sums = partials.column(2).as_primitive::<Decimal128Type>();
        let larger = Decimal128Array::from_iter(sums.iter().map(|v| v.map(|v| v + 100)))
            .with_data_type(sums.data_type().clone());
        let mut columns = partials.columns().to_vec();
        columns[2] = Arc::new(larger);
        let changed = RecordBatch::try_new(partials.schema(), columns).unwrap();
        let mut bytes = Vec::new();
        let mut writer = FileWriter::try_new(&mut bytes, &changed.schema()).unwrap();
        writer.write(&changed).unwrap();
        writer.finish().unwrap();
        drop(writer);
        std::fs::write(&file, bytes).unwrap();
        let (answered, plain, _) = answer(&path, &folder, REFUNDS).await;
        assert!(answered.contains("| 14.00 "), "{answered}");
        assert!(plain.contains("| 15.00 "), "{plain}");

        // A new file is read alone; the others' partials are kept as they were.
        append(&path, -3..0).await;
        let (answered, _, _) = answer(&path, &folder, REFUNDS).await;
        // 36.00 read from the files; the kept partial still counts 1.00 less.
        assert!(answered.contains("| 35.00   | 8 | -3"), "{answered}");
        assert_eq!(kept(&dir.path().join("partials")).1.num_rows(), 3);

        // Files no longer in the table drop out of the partials kept.
        let data = SessionContext::new().read_batch(rows(0..4)).unwrap();
        delta::overwrite(
            &path,
            data,
            &TableOptions::default(),
            &Default::default(),
            None,
        )
        .await
        .unwrap();
        let (answered, plain, _) = answer(&path, &folder, REFUNDS).await;
        assert_eq!(answered, plain);
        assert_eq!(kept(&dir.path().join("partials")).1.num_rows(), 1);
    }

    #[tokio::test]
    async fn aggregates_that_do_not_combine_from_files_run_as_they_are() {
        let (dir, path, folder) = two_files(0..10, 5..15).await;
        for sql in [
            "SELECT k, SUM(amount) FROM silver.t GROUP BY k",
            "SELECT COUNT(DISTINCT k) FROM silver.t",
            "SELECT AVG(amount) FROM silver.t",
            // A sum of floats depends on the order it adds in.
            "SELECT SUM(CAST(amount AS DOUBLE)) FROM silver.t",
            // The log's row counts answer it.
            "SELECT COUNT(*) FROM silver.t",
            "SELECT SUM(amount) FROM (SELECT amount FROM silver.t LIMIT 3)",
            "SELECT SUM(a.amount) FROM silver.t a JOIN silver.t b ON a.k = b.k",
            "SELECT SUM(amount) FROM silver.t WHERE random() < 2",
        ] {
            let (answered, plain, rewritten) = answer(&path, &folder, sql).await;
            assert!(!rewritten, "{sql}");
            assert_eq!(answered, plain);
        }
        assert!(!dir.path().join("partials").exists());
        // A count under a filter, and a sum in a subquery, are answered.
        for sql in [
            "SELECT COUNT(*) FROM silver.t WHERE k > 7",
            "SELECT 1 + (SELECT SUM(amount) FROM silver.t)",
        ] {
            let (answered, plain, rewritten) = answer(&path, &folder, sql).await;
            assert!(rewritten, "{sql}");
            assert_eq!(answered, plain, "{sql}");
        }
    }

    #[tokio::test]
    async fn a_union_is_answered_from_the_partials_of_files_read_whole_and_the_rest_as_it_is() {
        let (dir, path, folder) = two_files(0..10, 10..20).await;
        let union = "SELECT COALESCE(SUM(amount), 0) AS total, COUNT(amount) AS n, MIN(k) FROM \
                     (SELECT k, amount FROM silver.t UNION ALL SELECT k, amount FROM other \
                      UNION ALL SELECT k, amount FROM first WHERE k > 2)";
        for _ in 0..2 {
            let (answered, plain, rewritten) = answer(&path, &folder, union).await;
            assert!(rewritten);
            assert_eq!(answered, plain);
            // 0..20 less 5 each (90.00), -2..3 less 5 each (-25.00), and of `first`'s keys over 2
            // (3..10 or 10..20, whichever file the log holds first) less 5 each: 7.00 or 95.00.
            assert!(
                answered.contains("| 72.00 | 32 | -2 ") || answered.contains("| 160.00 | 35 | -2 "),
                "{answered}"
            );
        }
        // Kept: the partial of `first`'s one file (a provider of the target's files read whole); not
        // the whole table's, which a union reads as any other branch (a run's batch, say).
        assert_eq!(kept(&dir.path().join("partials")).1.num_rows(), 1);
    }
}
