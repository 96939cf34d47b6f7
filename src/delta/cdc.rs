//! CDC apply: a batch of change rows (one per source change, with an op column) is applied to a keyed
//! table so that, per key, the change with the greatest sequence ever delivered wins, whatever order the
//! batches arrive in and however often a change is delivered again.
//!
//! State per key is either a live row in the table (carrying the sequence of the change that wrote it) or a
//! tombstone in a companion table (keys and sequence of the delete), never both for long. A batch is
//! applied in four steps:
//!
//! 1. Reject ties: two changes of one key with an identical sequence have no defined order.
//! 2. Keep the last change per key within the batch (the others are *superseded*).
//! 3. Classify each remaining change against the live row and the tombstone of its key: older than or
//!    equal to either is *stale* (a late or re-delivered change); otherwise it is an insert, update,
//!    delete, or a delete of a key the table does not hold (*tombstone* only).
//! 4. Write the effective changes into the table in one commit, then record tombstones (added for
//!    deletes, removed by newer upserts) in the companion table. Only inserts: appended. Otherwise
//!    copy-on-write: the files holding a key the batch updates or deletes (found by the classification's
//!    join, which reads each live row's file) are rewritten without those rows, the inserts and updates
//!    are written beside them, and the commit removes the old files.
//!
//! Step 4 commits the table first: a crash before the tombstones commit leaves the watermark unmoved, and
//! the re-run classifies the same batch again, finds the table changes stale, and writes the tombstones.
//! Tombstones are kept without expiry: they hold only keys and sequences, and dropping one would let a
//! change older than the delete bring the row back.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
};

use crate::{
    engine::{
        scratch::Scratch,
        udf::repeated::{KeyBits, Keys, is_integer_key, key_in},
    },
    storage::Location,
};
use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch},
        datatypes::{DataType, Field, Schema, SchemaRef},
    },
    common::ScalarValue,
    datasource::MemTable,
    logical_expr::JoinType,
    prelude::{DataFrame, Expr, SessionContext, ident},
};
use deltalake::{
    kernel::Action,
    protocol::{DeltaOperation, MergePredicate},
};
use futures::StreamExt;

use super::{
    CommitMeta, DeltaError, TableOptions, WriteMetrics, create_if_missing,
    files::{KeyRanges, Layout},
    first_load::{LoadCopy, StagedLoad},
    merge::key_predicate,
    quote,
};

/// Commit-info key holding the touched values of tracked columns (see [`CdcMetrics::touched`]).
pub const TOUCHED_KEY: &str = "medallion.touched";

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
    /// Columns whose values before and after each applied change are recorded in the commit.
    pub track: Vec<String>,
    /// Where the tombstones of deleted keys live.
    pub tombstones: Location,
}

/// Values of a tracked column; `None` is SQL NULL.
pub type Touched = BTreeMap<String, BTreeSet<Option<String>>>;

/// What a CDC apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdcMetrics {
    pub write: WriteMetrics,
    /// Change rows read.
    pub rows_read: u64,
    /// Change rows replaced by a later change of the same key in the same batch.
    pub rows_superseded: u64,
    /// Changes not newer than the key's state (late or re-delivered), skipped.
    pub rows_stale: u64,
    /// Deletes of keys the table did not hold: recorded as tombstones only.
    pub tombstones_added: u64,
    pub files_scanned: u64,
    pub files_removed: u64,
    /// Per tracked column, its values before and after every applied change.
    pub touched: Touched,
}

const CHANGES: &str = "__medallion_changes";
const LATEST: &str = "__medallion_latest";
const REPEATED: &str = "__medallion_repeated";
/// Keys and sequences of the changes of [`REPEATED`] keys.
const REPEATED_CHANGES: &str = "__medallion_repeated_changes";
/// Keys and sequences of the changes that a later change of the same key in the batch replaces.
const SUPERSEDED: &str = "__medallion_superseded";
const TARGET: &str = "__medallion_target";
/// The target's files that hold keys the batch updates or deletes, read for the rewrite.
const REWRITTEN: &str = "__medallion_rewritten";
/// The function telling the keys a batch holds ([`crate::engine::udf::repeated::key_in`]).
const BATCH_KEY: &str = "__medallion_batch_key";
/// The function telling the keys a batch updates or deletes ([`crate::engine::udf::repeated::key_in`]).
const CHANGED_KEY: &str = "__medallion_changed_key";
/// In [`TARGET`], the file of each row (its full URL, as delta-rs's scans name files).
const FILE_ID: &str = "__medallion_file";
/// In [`CLASSIFIED`], the file holding the live row a change replaces or deletes.
const TARGET_FILE: &str = "__medallion_target_file";
const TOMBSTONES: &str = "__medallion_tombstones";
const CLASSIFIED: &str = "__medallion_classified";
/// The changes of [`CLASSIFIED`] with every column of the change and their action, for the steps that
/// read whole rows (the rows the write adds). Where [`CLASSIFIED`] compares a batch with a table, it
/// holds only the keys, sequences and classification of each change, and these rows are [`LATEST`]'s
/// joined with it where they are read: the comparison hashes, and the scratch holds, a few narrow
/// columns instead of every column of every change.
const CLASSIFIED_ROWS: &str = "__medallion_classified_rows";
const ACTION: &str = "__medallion_action";
const HAD_TOMBSTONE: &str = "__medallion_had_tombstone";
const IS_DELETE: &str = "__medallion_is_delete";

/// Logs, at debug level, the time each part of a cdc write took (`medallion -v run` shows them).
struct Timer {
    table: String,
    start: std::time::Instant,
}

impl Timer {
    fn new(path: &Location) -> Timer {
        Timer {
            table: path.to_string(),
            start: std::time::Instant::now(),
        }
    }

    /// Logs the time since the last part ended.
    fn done(&mut self, part: &str) {
        let elapsed = self.start.elapsed();
        tracing::debug!(table = %self.table, part, elapsed_ms = elapsed.as_millis() as u64, "cdc part done");
        self.start = std::time::Instant::now();
    }
}

/// A classified change batch, not yet committed: its counts are known and [`PreparedChanges::candidate_sql`]
/// shows the table as it would be after the commit, so that checks can run before anything is published.
pub struct PreparedChanges {
    path: Location,
    spec: CdcSpec,
    table: deltalake::DeltaTable,
    tombstones: deltalake::DeltaTable,
    stored_names: Vec<String>,
    options: TableOptions,
    counts: BTreeMap<String, u64>,
    metrics: CdcMetrics,
    /// The batch's least and greatest first key, as SQL literals (`None`: not an integer or string).
    key_bounds: Option<(String, String)>,
    /// A first load's rows, already written (see [`super::FirstLoad`]): the changes prepared are a
    /// narrow copy of the batch, and the commit publishes these files.
    staged: Option<StagedLoad>,
}

/// Applies a change batch in one go (prepare, then commit).
pub async fn apply_changes(
    path: &Location,
    ctx: &SessionContext,
    changes: DataFrame,
    spec: &CdcSpec,
    options: &TableOptions,
    meta: &CommitMeta,
) -> Result<CdcMetrics, DeltaError> {
    let scratch = Scratch::new(None).map_err(|e| DeltaError::Invalid {
        table: path.to_string(),
        message: e.to_string(),
    })?;
    let rows = changes
        .clone()
        .count()
        .await
        .map_err(|e| DeltaError::query(path, e))? as u64;
    match prepare_changes(path, ctx, &scratch, changes, rows, spec, options, None).await? {
        Some(prepared) => prepared.commit(ctx, meta).await,
        None => Ok(CdcMetrics::default()),
    }
}

/// Steps 1 to 3: checks, deduplicates and classifies the batch of `rows_read` rows (counted by the
/// caller, which has read it once already); `None` when it is empty. The batch's tables stay registered
/// in `ctx` for the commit, materialized in `scratch`, which must outlive the commit. With `staged`
/// (a first load written as it was computed), `changes` may hold only some of the stored columns: the
/// keys, sequences, op and tracked columns, and what the checks read.
#[allow(clippy::too_many_arguments)]
pub async fn prepare_changes(
    path: &Location,
    ctx: &SessionContext,
    scratch: &Scratch,
    changes: DataFrame,
    rows_read: u64,
    spec: &CdcSpec,
    options: &TableOptions,
    staged: Option<StagedLoad>,
) -> Result<Option<PreparedChanges>, DeltaError> {
    // Staged files are not published when the batch cannot be prepared.
    let written = staged
        .as_ref()
        .map(|s| (s.table.clone(), s.written.adds.clone()));
    let prepared = prepare(
        path, ctx, scratch, changes, rows_read, spec, options, staged,
    )
    .await;
    if let (Err(_), Some((table, adds))) = (&prepared, written) {
        super::files::discard_new(path, table.as_ref(), &adds).await;
    }
    prepared
}

#[allow(clippy::too_many_arguments)]
async fn prepare(
    path: &Location,
    ctx: &SessionContext,
    scratch: &Scratch,
    changes: DataFrame,
    rows_read: u64,
    spec: &CdcSpec,
    options: &TableOptions,
    staged: Option<StagedLoad>,
) -> Result<Option<PreparedChanges>, DeltaError> {
    let invalid = |message: String| DeltaError::Invalid {
        table: path.to_string(),
        message,
    };
    let query = |e| DeltaError::query(path, e);
    let schema = changes.schema().as_arrow().clone();
    for column in spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .chain(&spec.track)
        .chain(std::iter::once(&spec.op_column))
    {
        if schema.field_with_name(column).is_err() {
            return Err(invalid(format!(
                "the stage's SQL has no column `{column}`, which the cdc write needs"
            )));
        }
    }
    if rows_read == 0 {
        if let Some(staged) = staged {
            staged.discard(path).await;
        }
        return Ok(None);
    }
    ctx.register_table(CHANGES, changes.into_view())
        .map_err(query)?;
    let mut timer = Timer::new(path);
    // A staged first load was summed up as it was written; the summary holds while the changes are
    // the rows it saw (as many). Its plan found each key once, but the write counts them again, as a
    // stage's SQL need not give the same keys twice (`random()`, a `LIMIT`), and the commit refuses
    // files whose changes supersede one another.
    let summary = staged
        .as_ref()
        .map(|s| &s.summary)
        .filter(|s| s.rows == rows_read);
    if let Some(staged) = staged.as_ref().filter(|s| s.copy == LoadCopy::Flagged)
        && summary.is_none_or(|s| s.repeated != Some(0))
    {
        // Its copy holds only the flagged rows: classifying it would miss the others. (The caller,
        // `prepare_changes`, removes the files.)
        return Err(invalid(format!(
            "a first load that kept only its flagged rows could not be summed up as it was \
             written ({} row(s) kept, {rows_read} counted); nothing was published",
            staged.summary.rows
        )));
    }
    let latest_rows = latest_per_key(
        path,
        ctx,
        scratch,
        spec,
        &schema,
        rows_read,
        summary.and_then(|s| s.repeated),
        &mut timer,
    )
    .await?;
    timer.done("latest change per key");

    // The table holds every column but the op; the tombstones hold keys and sequence.
    let (stored_schema, table_options) =
        stored_table(&schema, spec, options, staged.as_ref().map(|s| &s.stored));
    let table = match &staged {
        Some(staged) => staged.table(path).await?,
        None => create_if_missing(path, &stored_schema, &table_options).await?,
    };
    let tombstone_fields: Vec<Field> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .filter_map(|c| schema.field_with_name(c).ok().cloned())
        .chain([Field::new("_run_id", DataType::Utf8, true)])
        .collect();
    let tombstone_options = TableOptions {
        partition_by: Vec::new(),
        description: Some(format!(
            "Tombstones of keys deleted from {}: keys and the sequence of the delete",
            path
        )),
        not_null: spec.keys.clone(),
        history_days: options.history_days,
        ..TableOptions::default()
    };
    let tombstones = create_if_missing(
        &spec.tombstones,
        &Arc::new(Schema::new(tombstone_fields)),
        &tombstone_options,
    )
    .await?;
    // A table without files holds no live rows to compare with (the first load): no join needed.
    let with_target = holds_files(&table);
    let with_tombstones = holds_files(&tombstones);
    let target = table
        .table_provider()
        .with_file_column(FILE_ID)
        .await
        .map_err(query)?;
    ctx.register_table(TARGET, target).map_err(query)?;
    ctx.register_table(
        TOMBSTONES,
        super::provider(&spec.tombstones, &tombstones).await?,
    )
    .map_err(query)?;

    // 3. Classify against the live rows (only the files whose key range can hold the batch's keys are
    // read) and the tombstones. A first load compares with nothing: its bounds come with its counts.
    let first_load = !with_target && !with_tombstones && spec.track.len() <= 1;
    let key_bounds = if first_load {
        None
    } else {
        let bounds = batch_key_bounds(ctx, spec, &schema).await.map_err(query)?;
        timer.done("key bounds");
        bounds
    };
    let mut prune = match &key_bounds {
        Some((low, high)) if with_target => {
            let key = spec.keys.first().map(String::as_str).unwrap_or_default();
            format!(" WHERE {} BETWEEN {low} AND {high}", quote(key))
        }
        _ => String::new(),
    };
    // One integer key, dense enough in the batch: the live rows are tested against a bitset of the
    // batch's keys before the join, which then looks up only the rows it can match (the batch's
    // updates and deletes), not every row of the files in the bounds (for a batch spread over the
    // whole table, every row of the table).
    if with_target
        && let Some((key, bits)) = batch_key_bits(ctx, spec, key_bounds.as_ref(), latest_rows)
            .await
            .map_err(query)?
    {
        ctx.register_udf(key_in(BATCH_KEY, bits));
        let test = format!("{BATCH_KEY}({})", quote(&key));
        prune = if prune.is_empty() {
            format!(" WHERE {test}")
        } else {
            format!("{prune} AND {test}")
        };
        timer.done("batch key set");
    }
    let narrow = with_target || with_tombstones;
    let classify = classify_sql(spec, &prune, with_target, with_tombstones, narrow);
    let classified = ctx.sql(&classify).await.map_err(query)?;
    if narrow {
        // The joins are read by every later step: computed once.
        scratch
            .materialize(ctx, CLASSIFIED, classified)
            .await
            .map_err(|e| engine_error(path, e))?;
        let rows = ctx.sql(&classified_rows_sql(spec)).await.map_err(query)?;
        ctx.register_table(CLASSIFIED_ROWS, rows.into_view())
            .map_err(query)?;
    } else {
        ctx.register_table(CLASSIFIED_ROWS, classified.clone().into_view())
            .map_err(query)?;
        ctx.register_table(CLASSIFIED, classified.into_view())
            .map_err(query)?;
    }
    timer.done("classification");
    let summed_up = summary.filter(|s| first_load && s.repeated == Some(0));
    let (counts, touched, key_bounds) = if let Some(summary) = summed_up {
        // Each key once and nothing to compare with: every change is an insert, or a tombstone when
        // it is a delete.
        let counts = [
            ("insert", summary.rows.saturating_sub(summary.deletes)),
            ("tombstone", summary.deletes),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(action, n)| (action.to_string(), n))
        .collect();
        (counts, summary.touched.clone(), summary.bounds.clone())
    } else if first_load {
        let summary = summarize(ctx, spec, &schema).await.map_err(query)?;
        timer.done("counts, touched values and key bounds");
        summary
    } else {
        let counts = action_counts(ctx).await.map_err(query)?;
        timer.done("action counts");
        let touched = touched_values(ctx, spec).await.map_err(query)?;
        timer.done("touched values");
        (counts, touched, key_bounds)
    };
    let count = |action: &str| counts.get(action).copied().unwrap_or(0);
    let metrics = CdcMetrics {
        rows_read,
        rows_superseded: rows_read.saturating_sub(latest_rows),
        rows_stale: count("stale"),
        tombstones_added: count("tombstone"),
        touched,
        ..CdcMetrics::default()
    };
    Ok(Some(PreparedChanges {
        path: path.clone(),
        spec: spec.clone(),
        table,
        tombstones,
        stored_names: stored_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect(),
        options: table_options,
        counts,
        metrics,
        key_bounds,
        staged,
    }))
}

impl PreparedChanges {
    /// Counts so far (no write metrics yet).
    pub fn metrics(&self) -> &CdcMetrics {
        &self.metrics
    }

    /// Changes that will alter the table: inserts, updates and deletes.
    pub fn applied_rows(&self) -> u64 {
        ["insert", "update", "delete"]
            .iter()
            .map(|a| self.counts.get(*a).copied().unwrap_or(0))
            .sum()
    }

    /// SQL for the table as it will be after the commit: live rows the batch does not replace or
    /// delete, plus the batch's inserts and updates ([`PreparedChanges::changed`], registered as
    /// `changed`). A staged first load has no live rows: its candidate is what it adds.
    pub fn candidate_sql(&self, changed: &str) -> String {
        if self.staged.is_some() {
            return format!("SELECT * FROM {changed}");
        }
        let join: Vec<String> = self
            .spec
            .keys
            .iter()
            .map(|k| format!("c.{0} = t.{0}", quote(k)))
            .collect();
        format!(
            "SELECT {cols} FROM {TARGET} t WHERE NOT EXISTS (SELECT 1 FROM {CLASSIFIED} c \
               WHERE {join} AND c.{ACTION} IN ('update', 'delete')) \
             UNION ALL {changed}",
            cols = self.stored_columns(),
            join = join.join(" AND "),
            changed = self.changed_sql(),
        )
    }

    /// The rows the commit adds to the table (inserts, and updates' new versions), as stored: what a
    /// check that should follow the batch, not the table, reads. A first load that kept only its
    /// flagged rows in scratch reads them from its files.
    pub async fn changed(&self, ctx: &SessionContext) -> Result<DataFrame, DeltaError> {
        match &self.staged {
            Some(staged) if staged.copy == LoadCopy::Flagged => {
                staged.written_rows(ctx, &self.table, &self.path).await
            }
            _ => ctx
                .sql(&self.changed_sql())
                .await
                .map_err(|e| DeltaError::query(&self.path, e)),
        }
    }

    /// SQL for [`PreparedChanges::changed`] over the classified changes.
    fn changed_sql(&self) -> String {
        format!(
            "SELECT {cols} FROM {CLASSIFIED_ROWS} WHERE {ACTION} IN ('insert', 'update')",
            cols = self.stored_columns()
        )
    }

    fn stored_columns(&self) -> String {
        let cols: Vec<String> = self.stored_names.iter().map(|n| quote(n)).collect();
        cols.join(", ")
    }

    /// Deletes the files of a staged first load: nothing is published.
    pub async fn discard(self) {
        if let Some(staged) = self.staged {
            staged.discard(&self.path).await;
        }
    }

    /// Step 4: the effective changes in one commit to the table, then the tombstones.
    pub async fn commit(
        self,
        ctx: &SessionContext,
        meta: &CommitMeta,
    ) -> Result<CdcMetrics, DeltaError> {
        let PreparedChanges {
            path,
            spec,
            table,
            tombstones,
            stored_names: names,
            options,
            counts,
            mut metrics,
            key_bounds,
            staged,
        } = self;
        let path = &path;
        let mut timer = Timer::new(path);
        let query = |e| DeltaError::query(path, e);
        let count = |action: &str| counts.get(action).copied().unwrap_or(0);
        let rewrites = count("update") + count("delete");
        let mut extra = Vec::new();
        if !spec.track.is_empty() {
            extra.push((
                TOUCHED_KEY.to_string(),
                serde_json::to_value(&metrics.touched).unwrap_or_default(),
            ));
        }
        let cols = names
            .iter()
            .map(|n| quote(n))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(staged) = staged {
            // The files hold every change but the deletes, so the classification must have found
            // inserts and tombstones only, one per change. (When the load's summary stood in for the
            // classification, its inserts are the files' rows by construction, and only its count of
            // rows, checked against the batch's, guards it.)
            let inserts = count("insert");
            let written = staged.written.rows;
            if rewrites > 0 || inserts != written || metrics.rows_superseded > 0 {
                staged.discard(path).await;
                return Err(DeltaError::Invalid {
                    table: path.to_string(),
                    message: format!(
                        "a first load written as computed holds {} row(s), where its changes \
                         classify as {inserts} insert(s), {rewrites} update(s) or delete(s) and {} \
                         superseded; nothing was published",
                        written, metrics.rows_superseded
                    ),
                });
            }
            // A failed commit keeps its files: it may have reached the log all the same.
            metrics.write =
                super::append::commit_written(path, &table, staged.written, meta, extra).await?;
        } else if rewrites == 0 && count("insert") > 0 {
            // Only keys the table does not hold (a first load, new rows): appended without a join.
            let source = ctx
                .sql(&format!(
                    "SELECT {cols} FROM {CLASSIFIED_ROWS} WHERE {ACTION} = 'insert'"
                ))
                .await
                .map_err(query)?;
            let key = spec.keys.first().map(String::as_str).unwrap_or_default();
            let stats = super::files::file_stats(path, &table, &HashSet::new(), key)?;
            let layout = clustered(&spec, &options, &key_bounds, None, count("insert"), &stats);
            metrics.write =
                super::append::append_frame_with(path, source, &options, meta, extra, &layout)
                    .await?;
        } else if rewrites > 0 {
            let (write, files, removed) = rewrite(
                ctx,
                path,
                &spec,
                &table,
                &cols,
                &counts,
                &key_bounds,
                &options,
                meta,
                extra,
            )
            .await?;
            metrics.write = write;
            metrics.files_scanned = files;
            metrics.files_removed = removed;
        }

        timer.done("table write");
        // Tombstones: added or moved forward by deletes, removed by upserts newer than them.
        crate::crash::point("after_silver_commit");
        if count("delete") + count("tombstone") + count("upsert_over_tombstone") > 0 {
            write_tombstones(ctx, &spec, tombstones, meta).await?;
            timer.done("tombstones write");
        }
        Ok(metrics)
    }
}

/// The columns and options of the table a cdc stage whose output is `schema` writes: every column but
/// the op (of those in `written`, when the rows were already written), its keys not null.
fn stored_table(
    schema: &Schema,
    spec: &CdcSpec,
    options: &TableOptions,
    written: Option<&SchemaRef>,
) -> (SchemaRef, TableOptions) {
    let stored: Vec<Field> = schema
        .fields()
        .iter()
        .filter(|f| f.name() != &spec.op_column)
        .filter(|f| written.is_none_or(|w| w.field_with_name(f.name()).is_ok()))
        .map(|f| f.as_ref().clone())
        .collect();
    let mut table_options = options.clone();
    table_options.not_null.extend(spec.keys.iter().cloned());
    (Arc::new(Schema::new(stored)), table_options)
}

/// Creates the table a cdc stage writes, empty (the caller found it missing): a first batch whose every
/// change was dropped or quarantined still leaves a table for the stages that read it, which then find
/// no rows rather than no table. Its version.
pub async fn create_empty(
    path: &Location,
    schema: &Schema,
    spec: &CdcSpec,
    options: &TableOptions,
) -> Result<Option<u64>, DeltaError> {
    let (stored, table_options) = stored_table(schema, spec, options, None);
    let table = create_if_missing(path, &stored, &table_options).await?;
    Ok(table.version())
}

/// Steps 1 and 2: registers as [`LATEST`] the last change per key of the batch; returns its row count.
/// Only keys changed more than once in the batch need ordering (and can tie), so only their changes'
/// keys and sequences are sorted, and the changes they supersede set aside. [`LATEST`] is the batch
/// less those, read where it is needed rather than copied (a full load is the whole table).
/// `repeated`: how many keys the batch holds more than once, when already known.
#[allow(clippy::too_many_arguments)]
async fn latest_per_key(
    path: &Location,
    ctx: &SessionContext,
    scratch: &Scratch,
    spec: &CdcSpec,
    schema: &Schema,
    rows_read: u64,
    repeated: Option<u64>,
    timer: &mut Timer,
) -> Result<u64, DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let materialize = |name, frame| async move {
        scratch
            .materialize(ctx, name, frame)
            .await
            .map_err(|e| engine_error(path, e))
    };
    let keys: Vec<String> = spec.keys.iter().map(|k| quote(k)).collect();
    let integer_key = match spec.keys.as_slice() {
        [key] => schema
            .field_with_name(key)
            .ok()
            .filter(|f| is_integer_key(f.data_type())),
        _ => None,
    };
    let repeated = match (repeated, integer_key) {
        (Some(0), _) => 0,
        (_, Some(key)) => repeated_integer_keys(ctx, key).await.map_err(query)?,
        (_, None) => {
            let repeated = ctx
                .sql(&format!(
                    "SELECT {keys} FROM {CHANGES} GROUP BY {keys} HAVING COUNT(*) > 1",
                    keys = keys.join(", ")
                ))
                .await
                .map_err(query)?;
            materialize(REPEATED, repeated).await?
        }
    };
    timer.done("keys changed more than once");
    if repeated == 0 {
        // Every key once: the batch is its own latest.
        let latest = ctx.table(CHANGES).await.map_err(query)?;
        ctx.register_table(LATEST, latest.into_view())
            .map_err(query)?;
        return Ok(rows_read);
    }
    // Keys and sequences are compared as GROUP BY compares them: NULL equal to NULL. The small side of
    // each join comes first, so that it is the one hashed.
    let matching = |columns: &[String], left: &str, right: &str| {
        columns
            .iter()
            .map(|c| format!("({left}.{c} IS NOT DISTINCT FROM {right}.{c})"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let state: Vec<String> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .map(|c| quote(c))
        .collect();
    let of_repeated = ctx
        .sql(&format!(
            "SELECT {columns} FROM {REPEATED} r RIGHT SEMI JOIN {CHANGES} c ON {on}",
            columns = prefixed("c", &state),
            on = matching(&keys, "r", "c"),
        ))
        .await
        .map_err(query)?;
    materialize(REPEATED_CHANGES, of_repeated).await?;
    reject_ties(path, ctx, spec, REPEATED_CHANGES).await?;
    // With ties rejected, a key and its sequence name one change.
    let order: Vec<String> = spec
        .sequence_by
        .iter()
        .map(|c| format!("{} DESC NULLS LAST", quote(c)))
        .collect();
    let superseded = ctx
        .sql(&format!(
            "SELECT {state} FROM (SELECT {state}, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {order}) \
               AS __medallion_rank FROM {REPEATED_CHANGES}) WHERE __medallion_rank > 1",
            state = state.join(", "),
            keys = keys.join(", "),
            order = order.join(", "),
        ))
        .await
        .map_err(query)?;
    let superseded = materialize(SUPERSEDED, superseded).await?;
    let columns: Vec<String> = schema.fields().iter().map(|f| quote(f.name())).collect();
    let latest = ctx
        .sql(&format!(
            "SELECT {columns} FROM {SUPERSEDED} s RIGHT ANTI JOIN {CHANGES} c ON {on}",
            columns = prefixed("c", &columns),
            on = matching(&state, "s", "c"),
        ))
        .await
        .map_err(query)?;
    ctx.register_table(LATEST, latest.into_view())
        .map_err(query)?;
    Ok(rows_read.saturating_sub(superseded))
}

/// Registers as [`REPEATED`] the values of the one integer key that the batch holds more than once,
/// found by [`repeated_keys`] over the key column alone (a pass over a bitset, where a `GROUP BY`
/// hashes every key: 0.7–1.0 s for a 10M first load); returns their count. NULL counts as one value,
/// as `GROUP BY` counts it.
async fn repeated_integer_keys(
    ctx: &SessionContext,
    key: &Field,
) -> datafusion::error::Result<u64> {
    let keys = ctx
        .sql(&format!("SELECT {} FROM {CHANGES}", quote(key.name())))
        .await?;
    let repeated = collect_keys(keys).await?.repeated();
    let count = repeated.len() as u64;
    let values: ArrayRef = Arc::new(Int64Array::from(repeated));
    let values = datafusion::arrow::compute::cast(&values, key.data_type())?;
    let schema = Arc::new(Schema::new(vec![key.clone().with_nullable(true)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![values])?;
    ctx.register_table(
        REPEATED,
        Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
    )?;
    Ok(count)
}

/// `columns` (quoted) of the table aliased `alias`, as a select list.
fn prefixed(alias: &str, columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn engine_error(path: &Location, error: crate::engine::EngineError) -> DeltaError {
    DeltaError::Invalid {
        table: path.to_string(),
        message: error.to_string(),
    }
}

/// Fails when two changes of one key in `changes` share the full sequence: which one wins would be
/// arbitrary.
async fn reject_ties(
    path: &Location,
    ctx: &SessionContext,
    spec: &CdcSpec,
    changes: &str,
) -> Result<(), DeltaError> {
    let group: Vec<String> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .map(|c| quote(c))
        .collect();
    let shown: Vec<String> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .map(|c| format!("CAST({} AS VARCHAR) AS {}", quote(c), quote(c)))
        .collect();
    let ties = ctx
        .sql(&format!(
            "SELECT {shown}, COUNT(*) AS __medallion_n FROM {changes} GROUP BY {group} \
             HAVING COUNT(*) > 1 ORDER BY __medallion_n DESC LIMIT 3",
            shown = shown.join(", "),
            group = group.join(", "),
        ))
        .await
        .map_err(|e| DeltaError::query(path, e))?
        .collect()
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    let mut examples = Vec::new();
    for batch in &ties {
        for row in 0..batch.num_rows() {
            let mut parts = Vec::new();
            for (i, name) in spec.keys.iter().chain(&spec.sequence_by).enumerate() {
                let column = datafusion::arrow::compute::cast(batch.column(i), &DataType::Utf8)
                    .map_err(|e| DeltaError::query(path, e.into()))?;
                let column = column.as_string::<i32>();
                let value = if column.is_null(row) {
                    "NULL".to_string()
                } else {
                    column.value(row).to_string()
                };
                parts.push(format!("{name}={value}"));
            }
            let count = ScalarValue::try_from_array(
                batch.column(spec.keys.len() + spec.sequence_by.len()),
                row,
            )
            .map_err(|e| DeltaError::query(path, e))?;
            examples.push(format!("{count} changes with {}", parts.join(", ")));
        }
    }
    if examples.is_empty() {
        return Ok(());
    }
    Err(DeltaError::Invalid {
        table: path.to_string(),
        message: format!(
            "changes of one key share the same sequence ({}), so which one wins is undefined: {}; \
             add a column to `sequence_by` that tells them apart, or fix the source. Nothing was written",
            spec.sequence_by.join(", "),
            examples.join("; ")
        ),
    })
}

/// The least and greatest first key of the batch's latest changes, as SQL literals, when that key is an
/// integer or a string: the classification reads only the live rows between them (the Delta scan
/// prunes files by their min/max statistics), and an integer key lays out the files written.
async fn batch_key_bounds(
    ctx: &SessionContext,
    spec: &CdcSpec,
    schema: &Schema,
) -> datafusion::error::Result<Option<(String, String)>> {
    let Some(key) = spec.keys.first() else {
        return Ok(None);
    };
    let Ok(field) = schema.field_with_name(key) else {
        return Ok(None);
    };
    let bounds = ctx
        .sql(&format!(
            "SELECT MIN({k}), MAX({k}) FROM {LATEST}",
            k = quote(key)
        ))
        .await?
        .collect()
        .await?;
    let Some(batch) = bounds.first().filter(|b| b.num_rows() == 1) else {
        return Ok(None);
    };
    let low = ScalarValue::try_from_array(batch.column(0), 0)?;
    let high = ScalarValue::try_from_array(batch.column(1), 0)?;
    Ok(key_literal(field, &low).zip(key_literal(field, &high)))
}

/// The batch's keys as a bitset, with the key's name, when there is one key, an integer in the batch
/// and in the target, with no NULL, and its `rows` values are dense enough between its `bounds`
/// ([`KeyBits::new`]; checked before the keys are gathered).
async fn batch_key_bits(
    ctx: &SessionContext,
    spec: &CdcSpec,
    bounds: Option<&(String, String)>,
    rows: u64,
) -> datafusion::error::Result<Option<(String, KeyBits)>> {
    let [key] = spec.keys.as_slice() else {
        return Ok(None);
    };
    let dense = bounds.is_some_and(|(low, high)| match (low.parse(), high.parse()) {
        (Ok(low), Ok(high)) => KeyBits::fits(low, high, rows as usize),
        _ => false,
    });
    if !dense {
        return Ok(None);
    }
    let integer = |frame: &DataFrame| {
        frame
            .schema()
            .field_with_unqualified_name(key)
            .is_ok_and(|f| is_integer_key(f.data_type()))
    };
    let keys = ctx
        .sql(&format!("SELECT {} FROM {LATEST}", quote(key)))
        .await?;
    if !integer(&keys) || !integer(&ctx.table(TARGET).await?) {
        return Ok(None);
    }
    Ok(collect_keys(keys)
        .await?
        .into_bits()
        .map(|bits| (key.clone(), bits)))
}

/// A bound of the first key as an SQL literal: `None` for NULL or a key neither integer nor string.
fn key_literal(field: &Field, value: &ScalarValue) -> Option<String> {
    if value.is_null() {
        return None;
    }
    match field.data_type() {
        t if t.is_integer() => Some(value.to_string()),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
            Some(format!("'{}'", value.to_string().replace('\'', "''")))
        }
        _ => None,
    }
}

/// [`action_counts`], [`touched_values`] and [`batch_key_bounds`] in one read of the classified batch,
/// grouped by action and the tracked column's values (at most one: a first load's groups are its
/// distinct values, a few thousand dates for millions of rows).
async fn summarize(
    ctx: &SessionContext,
    spec: &CdcSpec,
    schema: &Schema,
) -> datafusion::error::Result<(BTreeMap<String, u64>, Touched, Option<(String, String)>)> {
    let key = spec.keys.first().map(|k| quote(k));
    let tracked = if spec.track.is_empty() {
        String::new()
    } else {
        ", __medallion_before_0, __medallion_after_0".to_string()
    };
    let bounds = match &key {
        Some(key) => format!("MIN({key}), MAX({key})"),
        None => "NULL, NULL".to_string(),
    };
    let batches = ctx
        .sql(&format!(
            "SELECT {ACTION}, {HAD_TOMBSTONE}, COUNT(*), {bounds}{tracked} FROM {CLASSIFIED} \
             GROUP BY {ACTION}, {HAD_TOMBSTONE}{tracked}"
        ))
        .await?
        .collect()
        .await?;
    let mut counts = BTreeMap::new();
    let mut touched = Touched::new();
    let (mut low, mut high): (Option<ScalarValue>, Option<ScalarValue>) = (None, None);
    for batch in &batches {
        let actions = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let actions = actions.as_string::<i32>();
        let tombstoned = batch.column(1).as_boolean();
        let rows = datafusion::arrow::compute::cast(batch.column(2), &DataType::UInt64)?;
        let rows = rows.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
        let text = |i: usize| datafusion::arrow::compute::cast(batch.column(i), &DataType::Utf8);
        let values = match spec.track.first() {
            Some(column) => Some((column, text(5)?, text(6)?)),
            None => None,
        };
        for row in 0..batch.num_rows() {
            let action = actions.value(row);
            let n = rows.value(row);
            *counts.entry(action.to_string()).or_insert(0) += n;
            let upsert = matches!(action, "insert" | "update");
            if upsert && tombstoned.is_valid(row) && tombstoned.value(row) {
                *counts
                    .entry("upsert_over_tombstone".to_string())
                    .or_insert(0) += n;
            }
            if let Some((column, before, after)) = &values {
                let value = |array: &dyn Array| {
                    let strings = array.as_string::<i32>();
                    strings
                        .is_valid(row)
                        .then(|| strings.value(row).to_string())
                };
                let set = touched.entry((*column).clone()).or_default();
                if matches!(action, "update" | "delete") {
                    set.insert(value(before.as_ref()));
                }
                if upsert {
                    set.insert(value(after.as_ref()));
                }
            }
            for (i, bound, keep) in [
                (3, &mut low, std::cmp::Ordering::Less),
                (4, &mut high, std::cmp::Ordering::Greater),
            ] {
                let value = ScalarValue::try_from_array(batch.column(i), row)?;
                if value.is_null() {
                    continue;
                }
                if bound
                    .as_ref()
                    .is_none_or(|b| value.partial_cmp(b) == Some(keep))
                {
                    *bound = Some(value);
                }
            }
        }
    }
    let field = spec
        .keys
        .first()
        .and_then(|k| schema.field_with_name(k).ok());
    let bounds = match (field, low, high) {
        (Some(field), Some(low), Some(high)) => {
            key_literal(field, &low).zip(key_literal(field, &high))
        }
        _ => None,
    };
    Ok((counts, touched, bounds))
}

/// The layout of a cdc write of `rows` new rows with keys within `batch_bounds`, plus the rows of
/// rewritten files (`stats`): clustered by ranges of the first key when it is an integer, so that each
/// file holds one range of keys and a later batch rewrites only the files of the ranges it changes.
pub(super) fn clustered(
    spec: &CdcSpec,
    options: &TableOptions,
    batch_bounds: &Option<(String, String)>,
    files_bounds: Option<(i64, i64)>,
    rows: u64,
    stats: &super::files::FileStats,
) -> Layout {
    let mut layout = Layout::unclustered(options.target_file_size);
    let batch_bounds = batch_bounds
        .as_ref()
        .and_then(|(low, high)| low.parse::<i64>().ok().zip(high.parse::<i64>().ok()));
    let bounds = match (batch_bounds, files_bounds) {
        (Some((low, high)), Some((l, h))) => Some((low.min(l), high.max(h))),
        (bounds, None) | (None, bounds) => bounds,
    };
    if let (Some(bounds), Some(key)) = (bounds, spec.keys.first()) {
        layout.ranges = Some(KeyRanges::for_write(
            key,
            bounds,
            rows + stats.rows,
            stats.row_bytes,
            layout.target_size,
        ));
    }
    layout
}

/// Classification SQL; `prune` limits the live rows read. Without a target (or tombstones) to compare
/// with, its join side is `WHERE FALSE`, which the optimizer turns into no join at all.
fn classify_sql(
    spec: &CdcSpec,
    prune: &str,
    with_target: bool,
    with_tombstones: bool,
    narrow: bool,
) -> String {
    let prune = if with_target { prune } else { " WHERE FALSE" };
    // Narrow: the columns the classification reads, each once (a tracked column may be a key).
    let changes = if narrow {
        let mut columns: Vec<String> = Vec::new();
        for column in spec
            .keys
            .iter()
            .chain(&spec.sequence_by)
            .chain(std::iter::once(&spec.op_column))
            .chain(&spec.track)
        {
            let column = quote(column);
            if !columns.contains(&column) {
                columns.push(column);
            }
        }
        format!("(SELECT {} FROM {LATEST})", columns.join(", "))
    } else {
        LATEST.to_string()
    };
    let tombstones_filter = if with_tombstones { "" } else { " WHERE FALSE" };
    let keys: Vec<String> = spec.keys.iter().map(|k| quote(k)).collect();
    let state_columns: Vec<String> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .map(|c| quote(c))
        .collect();
    let target_columns: Vec<String> = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .chain(&spec.track)
        .map(|c| quote(c))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let join = |alias: &str| {
        keys.iter()
            .map(|k| format!("c.{k} = {alias}.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let is_delete = is_delete_sql(spec, "c.");
    let mut tracked = String::new();
    for (i, column) in spec.track.iter().enumerate() {
        tracked.push_str(&format!(
            ", tg.{c} AS __medallion_before_{i}, c.{c} AS __medallion_after_{i}",
            c = quote(column)
        ));
    }
    format!(
        "SELECT c.*, \
           CASE \
             WHEN tb.__present AND NOT COALESCE({newer_tb}, FALSE) THEN 'stale' \
             WHEN tg.__present AND NOT COALESCE({newer_tg}, FALSE) THEN 'stale' \
             WHEN {is_delete} AND tg.__present THEN 'delete' \
             WHEN {is_delete} THEN 'tombstone' \
             WHEN tg.__present THEN 'update' \
             ELSE 'insert' \
           END AS {ACTION}, \
           COALESCE(tb.__present, FALSE) AS {HAD_TOMBSTONE}, \
           {is_delete} AS {IS_DELETE}, tg.{FILE_ID} AS {TARGET_FILE}{tracked} \
         FROM {changes} c \
         LEFT JOIN (SELECT {target_columns}, {FILE_ID}, TRUE AS __present FROM {TARGET}{prune}) tg ON {join_tg} \
         LEFT JOIN (SELECT {state_columns}, TRUE AS __present FROM {TOMBSTONES}{tombstones_filter}) tb ON {join_tb}",
        newer_tb = newer_predicate("c", "tb", &spec.sequence_by),
        newer_tg = newer_predicate("c", "tg", &spec.sequence_by),
        target_columns = target_columns.join(", "),
        state_columns = state_columns.join(", "),
        join_tg = join("tg"),
        join_tb = join("tb"),
    )
}

/// SQL for "the change is a delete" (its op is one of the delete values; a NULL op is not), on the op
/// column prefixed by `prefix` (`c.`, or empty).
pub fn is_delete_sql(spec: &CdcSpec, prefix: &str) -> String {
    let deletes: Vec<String> = spec
        .delete_values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect();
    format!(
        "COALESCE({prefix}{} IN ({}), FALSE)",
        quote(&spec.op_column),
        deletes.join(", ")
    )
}

/// Whether `table` holds files (or its snapshot cannot tell, which counts as holding some).
pub fn holds_files(table: &deltalake::DeltaTable) -> bool {
    table
        .snapshot()
        .map_or(true, |s| s.log_data().num_files() > 0)
}

/// The integer keys of `frame`'s first column, each partition gathered on a task of its own (one
/// consumer appending every key took a third of a 10M first load's plan), a part per batch (see
/// [`Keys::append`]).
pub(super) async fn collect_keys(frame: DataFrame) -> datafusion::error::Result<Keys> {
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in frame.execute_stream_partitioned().await? {
        tasks.spawn(async move {
            let mut keys = Keys::default();
            while let Some(batch) = stream.next().await {
                keys.append(batch?.column(0))?;
            }
            Ok::<_, datafusion::error::DataFusionError>(keys)
        });
    }
    let mut keys = Keys::default();
    // On the first error the set is dropped, which stops the other tasks.
    while let Some(part) = tasks.join_next().await {
        keys.extend(part.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))??);
    }
    Ok(keys)
}

/// [`CLASSIFIED_ROWS`] for a narrow [`CLASSIFIED`]: each change of [`LATEST`] (one per key, a NULL
/// key included) with its action. The classification comes first, so that it is the side hashed.
fn classified_rows_sql(spec: &CdcSpec) -> String {
    let keys: Vec<String> = spec.keys.iter().map(|k| quote(k)).collect();
    let on: Vec<String> = keys
        .iter()
        .map(|k| format!("k.{k} IS NOT DISTINCT FROM c.{k}"))
        .collect();
    format!(
        "SELECT c.*, k.{ACTION} FROM (SELECT {keys}, {ACTION} FROM {CLASSIFIED}) k \
         JOIN {LATEST} c ON {on}",
        keys = keys.join(", "),
        on = on.join(" AND "),
    )
}

/// Rows per action in the classified batch; `upsert_over_tombstone` counts upserts that end a tombstone.
async fn action_counts(ctx: &SessionContext) -> datafusion::error::Result<BTreeMap<String, u64>> {
    let batches = ctx
        .sql(&format!(
            "SELECT a, COUNT(*) AS n FROM ( \
               SELECT {ACTION} AS a FROM {CLASSIFIED} \
               UNION ALL \
               SELECT 'upsert_over_tombstone' AS a FROM {CLASSIFIED} \
               WHERE {ACTION} IN ('insert', 'update') AND {HAD_TOMBSTONE}) GROUP BY a"
        ))
        .await?
        .collect()
        .await?;
    let mut counts = BTreeMap::new();
    for batch in &batches {
        let cast = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let names = cast.as_string::<i32>();
        let values = datafusion::arrow::compute::cast(batch.column(1), &DataType::UInt64)?;
        let values = values.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
        for row in 0..batch.num_rows() {
            *counts.entry(names.value(row).to_string()).or_insert(0) += values.value(row);
        }
    }
    Ok(counts)
}

/// For each tracked column, the values before (updates, deletes) and after (inserts, updates) the
/// changes that apply.
async fn touched_values(
    ctx: &SessionContext,
    spec: &CdcSpec,
) -> datafusion::error::Result<Touched> {
    let mut touched = Touched::new();
    for (i, column) in spec.track.iter().enumerate() {
        let values = distinct_strings(
            ctx,
            &format!(
                // Distinct first: casting every row to text costs more than the rest of the query.
                "SELECT CAST(v AS VARCHAR) FROM (SELECT DISTINCT v FROM ( \
                   SELECT __medallion_before_{i} AS v FROM {CLASSIFIED} WHERE {ACTION} IN ('update', 'delete') \
                   UNION ALL \
                   SELECT __medallion_after_{i} AS v FROM {CLASSIFIED} WHERE {ACTION} IN ('insert', 'update')))"
            ),
        )
        .await?;
        touched.entry(column.clone()).or_default().extend(values);
    }
    Ok(touched)
}

/// The values of the first column of `sql`'s result, as text (`None` for NULL).
async fn distinct_strings(
    ctx: &SessionContext,
    sql: &str,
) -> datafusion::error::Result<Vec<Option<String>>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let mut values = Vec::new();
    for batch in &batches {
        let cast = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let strings = cast.as_string::<i32>();
        values.extend((0..batch.num_rows()).map(|row| {
            strings
                .is_valid(row)
                .then(|| strings.value(row).to_string())
        }));
    }
    Ok(values)
}

/// Step 4 for a batch that updates or deletes rows, copy-on-write: the files holding those rows are
/// rewritten without them, the batch's inserts and updates are written beside them, and one commit swaps
/// the new files for the old. Files holding no changed key are not read. Returns the write's metrics
/// and the number of files rewritten.
#[allow(clippy::too_many_arguments)]
async fn rewrite(
    ctx: &SessionContext,
    path: &Location,
    spec: &CdcSpec,
    table: &deltalake::DeltaTable,
    cols: &str,
    counts: &BTreeMap<String, u64>,
    key_bounds: &Option<(String, String)>,
    options: &TableOptions,
    meta: &CommitMeta,
    extra: Vec<(String, serde_json::Value)>,
) -> Result<(WriteMetrics, u64, u64), DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let count = |action: &str| counts.get(action).copied().unwrap_or(0);
    let files = touched_files(ctx).await.map_err(query)?;
    if files.is_empty() {
        // Updates and deletes are classified so because a live row matched: its file is known.
        return Err(DeltaError::Invalid {
            table: path.to_string(),
            message: "the batch updates or deletes rows, but no file holding them was found".into(),
        });
    }
    let rewritten = table
        .table_provider()
        .with_file_paths(files.iter().cloned())
        .build()
        .await
        .map_err(query)?;
    let rewritten = Arc::new(rewritten);
    ctx.register_table(REWRITTEN, rewritten.clone())
        .map_err(query)?;
    // The rows of those files whose key the batch does not update or delete: for one integer key
    // whose changed values are dense enough, a bit test per row; otherwise a right anti join with the
    // batch's keys as its build side (hashing the files' rows instead would hold them all).
    let changed_keys: Vec<String> = spec
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS __medallion_key_{i}", quote(k)))
        .collect();
    let changed = ctx
        .sql(&format!(
            "SELECT {} FROM {CLASSIFIED} WHERE {ACTION} IN ('update', 'delete')",
            changed_keys.join(", ")
        ))
        .await
        .map_err(query)?;
    // The key's type in the files, which the filter reads.
    let stored_key = match spec.keys.as_slice() {
        [key] => ctx.table(REWRITTEN).await.ok().and_then(|t| {
            t.schema()
                .field_with_unqualified_name(key)
                .ok()
                .map(|f| f.data_type().clone())
        }),
        _ => None,
    };
    if let [key] = spec.keys.as_slice()
        && is_integer_key(changed.schema().field(0).data_type())
        && stored_key.as_ref().is_some_and(is_integer_key)
        && super::deletion_vectors_enabled(table)
    {
        let keys = collect_keys(changed).await.map_err(query)?.into_set();
        let kept = super::deletion_vectors::kept_rows(&rewritten, ctx)
            .await
            .map_err(query)?;
        let upserts = ctx
            .sql(&format!(
                "SELECT {cols} FROM {CLASSIFIED_ROWS} WHERE {ACTION} IN ('insert', 'update')"
            ))
            .await
            .map_err(query)?;
        let stats = super::files::file_stats(path, table, &files, key)?;
        let expected = count("update") + count("delete");
        // Written last before the new rows, so that no error in between leaves its file behind.
        let marked =
            super::deletion_vectors::mark(path, table, &files, &kept, key, &keys, expected).await?;
        let layout = beside(
            spec,
            options,
            key_bounds,
            &stats,
            count("insert") + count("update"),
            files.len(),
        );
        let written = match super::files::write_files(path, table, upserts, &layout).await {
            Ok(written) => written,
            Err(error) => {
                marked.discard(path, table).await;
                return Err(error);
            }
        };
        // A failed commit leaves its files: it may have landed all the same (a lost reply). An
        // unreferenced file is invisible to readers.
        let write = commit_batch(
            path,
            table,
            marked.actions,
            written.adds,
            spec,
            meta,
            extra,
            count,
        )
        .await?;
        return Ok((write, files.len() as u64, marked.removed));
    }
    let changed_set = match spec.keys.as_slice() {
        [key]
            if is_integer_key(changed.schema().field(0).data_type())
                && stored_key.as_ref().is_some_and(is_integer_key) =>
        {
            collect_keys(changed.clone())
                .await
                .map_err(query)?
                .into_bits()
                .map(|bits| (key, bits))
        }
        _ => None,
    };
    let kept = match changed_set {
        Some((key, bits)) => {
            ctx.register_udf(key_in(CHANGED_KEY, bits));
            ctx.sql(&format!(
                "SELECT {cols} FROM {REWRITTEN} WHERE NOT {CHANGED_KEY}({})",
                quote(key)
            ))
            .await
            .map_err(query)?
        }
        None => {
            let files_rows = ctx
                .sql(&format!("SELECT {cols} FROM {REWRITTEN}"))
                .await
                .map_err(query)?;
            let on: Vec<Expr> = spec
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| ident(format!("__medallion_key_{i}")).eq(ident(k)))
                .collect();
            changed
                .join_on(files_rows, JoinType::RightAnti, on)
                .map_err(query)?
        }
    };
    let upserts = ctx
        .sql(&format!(
            "SELECT {cols} FROM {CLASSIFIED_ROWS} WHERE {ACTION} IN ('insert', 'update')"
        ))
        .await
        .map_err(query)?;
    let rows = kept.union(upserts).map_err(query)?;
    // The files' key range is only known for an integer key; a string key is not clustered.
    let key = spec.keys.first().map(String::as_str).unwrap_or_default();
    let stats = super::files::file_stats(path, table, &files, key)?;
    // Rows written: the files' rows (less the updated and deleted, plus the updated) and the inserts.
    let layout = match stats.key_bounds {
        Some(bounds) => clustered(
            spec,
            options,
            key_bounds,
            Some(bounds),
            count("insert"),
            &stats,
        ),
        None => Layout::unclustered(options.target_file_size),
    };
    let written = super::files::write_files(path, table, rows, &layout).await?;
    let removes = super::files::removes(path, table, &files)?;
    let write = commit_batch(path, table, removes, written.adds, spec, meta, extra, count).await?;
    Ok((write, files.len() as u64, files.len() as u64))
}

/// Commits a batch as one merge: `actions` on the table's files, and the `added` files.
#[allow(clippy::too_many_arguments)]
async fn commit_batch(
    path: &Location,
    table: &deltalake::DeltaTable,
    mut actions: Vec<Action>,
    added: Vec<deltalake::kernel::Add>,
    spec: &CdcSpec,
    meta: &CommitMeta,
    extra: Vec<(String, serde_json::Value)>,
    count: impl Fn(&str) -> u64,
) -> Result<WriteMetrics, DeltaError> {
    let files_added = added.len() as u64;
    actions.extend(added.into_iter().map(Action::Add));
    let version = super::files::commit(
        path,
        table,
        actions,
        merge_operation(&spec.keys),
        meta.properties_with(extra),
    )
    .await?;
    Ok(write_metrics(version, count, files_added))
}

/// The smallest file [`beside`] cuts a batch's new rows into, against a table's files of 128 MiB.
const LEAST_BESIDE_FILE: u64 = 1024 * 1024;

/// How a batch's new rows (`rows` of them) are laid out when the `files` it touches keep theirs
/// (deletion vectors): in as many key ranges as those files, so that each new file holds the keys of a
/// file it changed. A reader's filter on the key, or on a date that grows with it (Gold's slices),
/// then reads one of them rather than every new row; without ranges, each slice of a Gold rebuild read
/// all of a batch spread over the table.
fn beside(
    spec: &CdcSpec,
    options: &TableOptions,
    batch_bounds: &Option<(String, String)>,
    stats: &super::files::FileStats,
    rows: u64,
    files: usize,
) -> Layout {
    let Some(bounds) = stats.key_bounds else {
        return Layout::unclustered(options.target_file_size);
    };
    let row_bytes = stats.row_bytes.unwrap_or(super::files::ASSUMED_ROW_BYTES);
    let bytes = rows.saturating_mul(row_bytes.max(1));
    let each = (bytes / files.max(1) as u64).max(LEAST_BESIDE_FILE);
    let ranged = TableOptions {
        target_file_size: Some(each.min(options.target_file_size.unwrap_or(u64::MAX))),
        ..options.clone()
    };
    let new_rows = super::files::FileStats {
        row_bytes: stats.row_bytes,
        ..Default::default()
    };
    clustered(spec, &ranged, batch_bounds, Some(bounds), rows, &new_rows)
}

/// The operation a batch's commit records: a merge on `keys`.
fn merge_operation(keys: &[String]) -> DeltaOperation {
    let predicate = |action: &str, predicate: &str| MergePredicate {
        action_type: action.to_string(),
        predicate: Some(predicate.to_string()),
    };
    DeltaOperation::Merge {
        // No predicate: the commit conflicts with any concurrent change to the table.
        predicate: None,
        merge_predicate: Some(key_predicate(keys)),
        matched_predicates: vec![
            predicate("delete", "the change is a newer delete"),
            predicate("update", "the change is a newer update"),
        ],
        not_matched_predicates: vec![predicate("insert", "the change is an insert")],
        not_matched_by_source_predicates: Vec::new(),
    }
}

/// What a batch's commit at `version` wrote, from its action counts.
fn write_metrics(version: u64, count: impl Fn(&str) -> u64, files_added: u64) -> WriteMetrics {
    WriteMetrics {
        rows_source: None,
        version: Some(version),
        rows_written: count("insert") + count("update"),
        rows_inserted: count("insert"),
        rows_updated: count("update"),
        rows_deleted: count("delete"),
        files_added,
    }
}

/// The files (scan file ids) holding the live rows that the batch updates or deletes.
async fn touched_files(ctx: &SessionContext) -> datafusion::error::Result<HashSet<String>> {
    let files = distinct_strings(
        ctx,
        &format!(
            "SELECT DISTINCT CAST({TARGET_FILE} AS VARCHAR) FROM {CLASSIFIED} \
             WHERE {ACTION} IN ('update', 'delete')"
        ),
    )
    .await?;
    Ok(files.into_iter().flatten().collect())
}

async fn write_tombstones(
    ctx: &SessionContext,
    spec: &CdcSpec,
    tombstones: deltalake::DeltaTable,
    meta: &CommitMeta,
) -> Result<(), DeltaError> {
    let path = &spec.tombstones;
    let query = |e| DeltaError::query(path, e);
    let state: Vec<String> = spec.keys.iter().chain(&spec.sequence_by).cloned().collect();
    let source = ctx
        .sql(&format!(
            "SELECT {cols}, {IS_DELETE}, '{run}' AS \"_run_id\" FROM {CLASSIFIED} \
             WHERE {ACTION} IN ('delete', 'tombstone') \
                OR ({ACTION} IN ('insert', 'update') AND {HAD_TOMBSTONE})",
            cols = state
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", "),
            run = meta.run_id.replace('\'', "''"),
        ))
        .await
        .map_err(query)?;
    let mut set_columns = state.clone();
    set_columns.push("_run_id".to_string());
    let insert_columns = set_columns.clone();
    let properties = super::writer_properties(&tombstones);
    tombstones
        .merge(source, key_predicate(&spec.keys))
        .with_session_state(Arc::new(ctx.state()))
        .with_source_alias("s")
        .with_writer_properties(properties)
        .with_target_alias("t")
        .when_matched_delete(|d| d.predicate(format!("NOT s.{IS_DELETE}")))
        .and_then(|m| {
            m.when_matched_update(|mut u| {
                u = u.predicate(format!("s.{IS_DELETE}"));
                for c in &set_columns {
                    u = u.update(c.as_str(), format!("s.{}", quote(c)));
                }
                u
            })
        })
        .and_then(|m| {
            m.when_not_matched_insert(|mut i| {
                i = i.predicate(format!("s.{IS_DELETE}"));
                for c in &insert_columns {
                    i = i.set(c.as_str(), format!("s.{}", quote(c)));
                }
                i
            })
        })
        .map_err(|e| DeltaError::table(path, e))?
        .with_commit_properties(meta.properties())
        .await
        .map_err(|e| DeltaError::table(path, e))?;
    Ok(())
}

/// Lexicographic `a.seq > b.seq` over the sequence columns.
fn newer_predicate(a: &str, b: &str, sequence_by: &[String]) -> String {
    match sequence_by.split_first() {
        None => "TRUE".to_string(),
        Some((first, [])) => format!("{a}.{0} > {b}.{0}", quote(first)),
        Some((first, rest)) => format!(
            "({a}.{0} > {b}.{0} OR ({a}.{0} = {b}.{0} AND {1}))",
            quote(first),
            newer_predicate(a, b, rest)
        ),
    }
}

/// Reads, from the commits of a cdc table after `after_version`, the touched values of `column`. `None`
/// when they cannot be known (a commit that changed data without recording them, or a commit no longer in
/// the log): the caller then recomputes everything.
pub async fn touched_since(
    table: &deltalake::DeltaTable,
    after_version: u64,
    column: &str,
) -> Result<Option<BTreeSet<Option<String>>>, DeltaError> {
    let Some(commits) = super::commits_since(table, after_version).await? else {
        return Ok(None);
    };
    let mut values = BTreeSet::new();
    for commit in commits {
        let recorded = commit
            .info
            .get(TOUCHED_KEY)
            .and_then(|t| t.get(column))
            .cloned();
        match (recorded, commit.changes_data) {
            (Some(serde_json::Value::Array(list)), _) => {
                values.extend(list.iter().map(|v| v.as_str().map(str::to_string)));
            }
            (_, false) => {}
            (_, true) => return Ok(None),
        }
    }
    Ok(Some(values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Date32Array, Int64Array, RecordBatch, StringArray};

    /// Changes of `(key, sequence, op, day)`, days counted from 2020-01-01.
    fn changes(ctx: &SessionContext, rows: &[(i64, i64, &str, i32)]) -> DataFrame {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("seq", DataType::Int64, false),
            Field::new("op", DataType::Utf8, false),
            Field::new("day", DataType::Date32, true),
        ]));
        let epoch = 18_262; // 2020-01-01
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Date32Array::from_iter_values(
                    rows.iter().map(|r| epoch + r.3),
                )),
            ],
        )
        .unwrap();
        ctx.read_batch(batch).unwrap()
    }

    /// The spec of a table in `dir` keyed on `k`, sequenced by `seq`, tracking `track`; its path; the
    /// commit's metadata.
    fn table_in(dir: &std::path::Path, track: &[&str]) -> (CdcSpec, Location, CommitMeta) {
        let spec = CdcSpec {
            keys: vec!["k".into()],
            sequence_by: vec!["seq".into()],
            op_column: "op".into(),
            delete_values: vec!["D".into()],
            track: track.iter().map(|c| c.to_string()).collect(),
            tombstones: Location::local(dir.join("tombstones")),
        };
        let meta = CommitMeta {
            run_id: "run".into(),
            stage: "stage".into(),
        };
        (spec, Location::local(dir.join("table")), meta)
    }

    fn days(touched: &Touched) -> Vec<String> {
        touched["day"].iter().flatten().cloned().collect()
    }

    #[tokio::test]
    async fn a_first_load_counts_and_tracks_in_one_read_what_later_batches_count_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(dir.path(), &["day"]);
        let apply = |rows: &'static [(i64, i64, &'static str, i32)]| {
            let (path, spec, meta) = (&path, &spec, &meta);
            async move {
                let ctx = super::super::session(None).unwrap();
                let batch = changes(&ctx, rows);
                apply_changes(path, &ctx, batch, spec, &TableOptions::default(), meta)
                    .await
                    .unwrap()
            }
        };

        // Keys 1 to 4 inserted (3 twice: its second change wins), 9 deleted without ever being held.
        let first = apply(&[
            (1, 1, "I", 0),
            (2, 1, "I", 1),
            (3, 1, "I", 2),
            (3, 2, "U", 5),
            (4, 1, "I", 2),
            (9, 1, "D", 7),
        ])
        .await;
        assert_eq!(first.rows_read, 6);
        assert_eq!(first.rows_superseded, 1);
        assert_eq!(first.tombstones_added, 1);
        assert_eq!(first.write.rows_inserted, 4);
        assert_eq!(
            days(&first.touched),
            ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-06"]
        );

        // Against the table: key 1 moves from the 1st to the 9th, 2 is deleted, 5 is new.
        let second = apply(&[(1, 2, "U", 8), (2, 2, "D", 3), (5, 1, "I", 4)]).await;
        assert_eq!(second.rows_superseded, 0);
        assert_eq!(
            (
                second.write.rows_inserted,
                second.write.rows_updated,
                second.write.rows_deleted
            ),
            (1, 1, 1)
        );
        assert_eq!(
            days(&second.touched),
            ["2020-01-01", "2020-01-02", "2020-01-05", "2020-01-09"]
        );
    }

    /// A first load summed up as it is written (keys, deletes, bounds, tracked values of the rows it
    /// keeps) classifies as the general path's read of the same changes: the same counts and touched
    /// values, the rows an expectation drops left out of both.
    #[tokio::test]
    async fn a_first_load_summed_up_as_it_is_written_classifies_as_a_read_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(dir.path(), &["day"]);
        let ctx = super::super::session(None).unwrap();
        // Key 4 is deleted on a day no kept insert has; key 9 is dropped, on a day of its own; key 3
        // has no day.
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("seq", DataType::Int64, false),
            Field::new("op", DataType::Utf8, false),
            Field::new("day", DataType::Date32, true),
            Field::new("passes", DataType::Boolean, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![7, 1, 9, 3, 4, 2])),
                Arc::new(Int64Array::from(vec![1; 6])),
                Arc::new(StringArray::from(vec!["I", "I", "I", "U", "D", "I"])),
                Arc::new(Date32Array::from(vec![
                    Some(18_262),
                    Some(18_263),
                    Some(18_270),
                    None,
                    Some(18_280),
                    Some(18_262),
                ])),
                Arc::new(datafusion::arrow::array::BooleanArray::from(vec![
                    true, true, false, true, true, true,
                ])),
            ],
        )
        .unwrap();
        ctx.register_batch("computed", batch.clone()).unwrap();
        let output = ctx
            .sql("SELECT k, seq, op, day FROM computed")
            .await
            .unwrap();
        let kept = |ctx: SessionContext| async move {
            ctx.sql("SELECT k, seq, op, day FROM computed WHERE passes")
                .await
                .unwrap()
        };
        let options = TableOptions::default();
        // Kept in scratch: the flagged rows and deletes alone; the rows added are read from the files.
        let staged = stage_first_load(
            &ctx,
            &path,
            &spec,
            &output,
            "passes",
            "computed",
            LoadCopy::Flagged,
        )
        .await;
        let day = |d: &str| Some(d.to_string());
        assert_eq!(
            staged.summary,
            super::super::first_load::LoadSummary {
                seen: 6,
                rows: 5,
                repeated: Some(0),
                deletes: 1,
                bounds: Some(("1".into(), "7".into())),
                touched: Touched::from([(
                    "day".to_string(),
                    BTreeSet::from([None, day("2020-01-01"), day("2020-01-02")])
                )]),
            }
        );
        let scratch = Scratch::new(None).unwrap();
        let prepared = prepare_changes(
            &path,
            &ctx,
            &scratch,
            kept(ctx.clone()).await,
            5,
            &spec,
            &options,
            Some(staged),
        )
        .await
        .unwrap()
        .expect("changes");
        let changed = prepared
            .changed(&ctx)
            .await
            .unwrap()
            .sort_by(vec![datafusion::prelude::col("k")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            datafusion::arrow::util::pretty::pretty_format_batches(&changed)
                .unwrap()
                .to_string(),
            [
                "+---+-----+------------+",
                "| k | seq | day        |",
                "+---+-----+------------+",
                "| 1 | 1   | 2020-01-02 |",
                "| 2 | 1   | 2020-01-01 |",
                "| 3 | 1   |            |",
                "| 7 | 1   | 2020-01-01 |",
                "+---+-----+------------+",
            ]
            .join("\n"),
            "the rows added, from the files: not the dropped row, not the delete"
        );
        let summed = prepared.commit(&ctx, &meta).await.unwrap();

        let other = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(other.path(), &["day"]);
        let ctx = super::super::session(None).unwrap();
        ctx.register_batch("computed", batch).unwrap();
        let read = apply_changes(&path, &ctx, kept(ctx.clone()).await, &spec, &options, &meta)
            .await
            .unwrap();
        assert_eq!(
            (
                summed.rows_read,
                summed.rows_superseded,
                summed.tombstones_added,
                summed.write.rows_inserted,
                &summed.touched
            ),
            (
                read.rows_read,
                read.rows_superseded,
                read.tombstones_added,
                read.write.rows_inserted,
                &read.touched
            )
        );
        assert_eq!(
            (summed.write.rows_inserted, summed.tombstones_added),
            (4, 1)
        );
    }

    /// A first load whose SQL gives a key twice in the write where its plan saw it once (`random()`, a
    /// `LIMIT`) is summed up with the key repeated, is classified the general way, and publishes
    /// nothing: no commit, no file left.
    #[tokio::test]
    async fn a_first_load_written_with_a_key_its_plan_saw_once_publishes_nothing() {
        // With a copy of its flagged rows alone, the load is refused before it is classified.
        for copy in [LoadCopy::Every, LoadCopy::Flagged] {
            let dir = tempfile::tempdir().unwrap();
            let (spec, path, meta) = table_in(dir.path(), &["day"]);
            let ctx = super::super::session(None).unwrap();
            let planned = changes(&ctx, &[(1, 1, "I", 0), (2, 1, "I", 1)]);
            let written = changes(&ctx, &[(1, 1, "I", 0), (2, 1, "I", 1), (2, 2, "U", 3)]);
            ctx.register_table("written", written.into_view()).unwrap();
            let staged =
                stage_first_load(&ctx, &path, &spec, &planned, "TRUE", "written", copy).await;
            assert_eq!((staged.summary.rows, staged.summary.repeated), (3, Some(1)));
            let scratch = Scratch::new(None).unwrap();
            let changes = ctx.table("written").await.unwrap();
            let prepared = prepare_changes(
                &path,
                &ctx,
                &scratch,
                changes,
                3,
                &spec,
                &TableOptions::default(),
                Some(staged),
            )
            .await;
            let published = match prepared {
                Ok(Some(prepared)) => {
                    assert_eq!(copy, LoadCopy::Every, "refused before it is classified");
                    prepared.commit(&ctx, &meta).await.is_ok()
                }
                Ok(None) => false,
                Err(error) => {
                    assert_eq!(
                        error.to_string().contains("kept only its flagged rows"),
                        copy == LoadCopy::Flagged,
                        "{error}"
                    );
                    false
                }
            };
            assert!(!published, "a load whose changes supersede one another");
            let files: Vec<_> = walkdir(&dir.path().join("table"))
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            assert!(files.is_empty(), "no file left: {files:?}");
            assert!(
                super::super::open(&path)
                    .await
                    .unwrap()
                    .is_none_or(|t| !holds_files(&t)),
                "nothing committed"
            );
        }
    }

    /// A first load whose keys are too sparse for bitsets is not summed up as written: its keys are
    /// found again on the copy, and it publishes what the general path counts.
    #[tokio::test]
    async fn a_first_load_of_sparse_keys_is_classified_the_general_way() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(dir.path(), &["day"]);
        let ctx = super::super::session(None).unwrap();
        let rows = [(1, 1, "I", 0), (1_000_000, 1, "I", 1), (7, 1, "D", 2)];
        let output = changes(&ctx, &rows);
        ctx.register_table("output", output.clone().into_view())
            .unwrap();
        let staged = stage_first_load(
            &ctx,
            &path,
            &spec,
            &output,
            "TRUE",
            "output",
            LoadCopy::Every,
        )
        .await;
        assert_eq!(
            (
                staged.summary.rows,
                staged.summary.repeated,
                staged.summary.deletes
            ),
            (3, None, 1)
        );
        let scratch = Scratch::new(None).unwrap();
        let metrics = prepare_changes(
            &path,
            &ctx,
            &scratch,
            output,
            3,
            &spec,
            &TableOptions::default(),
            Some(staged),
        )
        .await
        .unwrap()
        .expect("changes")
        .commit(&ctx, &meta)
        .await
        .unwrap();
        assert_eq!(
            (metrics.write.rows_inserted, metrics.tombstones_added),
            (2, 1)
        );
        assert_eq!(days(&metrics.touched), ["2020-01-01", "2020-01-02"]);
    }

    /// A batch's updates and deletes leave the rewritten files alike whether their keys are dense
    /// (filtered by a bit test) or sparse (an anti join): the live rows are the rows kept plus the
    /// upserts, each key once.
    #[tokio::test]
    async fn rewritten_files_keep_the_same_rows_for_dense_and_sparse_changed_keys() {
        for step in [1, 1_000_000_000_i64] {
            let dir = tempfile::tempdir().unwrap();
            let (spec, path, meta) = table_in(dir.path(), &[]);
            let key = |i: i64| i * step;
            let ctx = super::super::session(None).unwrap();
            let first: Vec<(i64, i64, &str, i32)> = (1..=6).map(|i| (key(i), 1, "I", 0)).collect();
            let first = changes(&ctx, &first);
            apply_changes(&path, &ctx, first, &spec, &TableOptions::default(), &meta)
                .await
                .unwrap();
            let ctx = super::super::session(None).unwrap();
            let batch = changes(
                &ctx,
                &[
                    (key(2), 2, "U", 5),
                    (key(5), 2, "D", 0),
                    (key(9), 1, "I", 1),
                ],
            );
            let metrics = apply_changes(&path, &ctx, batch, &spec, &TableOptions::default(), &meta)
                .await
                .unwrap();
            use datafusion::execution::FunctionRegistry;
            assert_eq!(
                ctx.udf(CHANGED_KEY).is_ok(),
                step == 1,
                "a bit test for dense keys, an anti join for sparse ones"
            );
            assert_eq!(
                (
                    metrics.write.rows_inserted,
                    metrics.write.rows_updated,
                    metrics.write.rows_deleted
                ),
                (1, 1, 1)
            );
            let ctx = super::super::session(None).unwrap();
            let table = super::super::open(&path).await.unwrap().unwrap();
            ctx.register_table("t", super::super::provider(&path, &table).await.unwrap())
                .unwrap();
            let rows = ctx
                .sql("SELECT k, seq FROM t ORDER BY k")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let live: Vec<(i64, i64)> = rows
                .iter()
                .flat_map(|b| {
                    let k = b
                        .column(0)
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
                    let seq = b
                        .column(1)
                        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
                    k.values()
                        .iter()
                        .copied()
                        .zip(seq.values().iter().copied())
                        .collect::<Vec<_>>()
                })
                .collect();
            let expected: Vec<(i64, i64)> = [(1, 1), (2, 2), (3, 1), (4, 1), (6, 1), (9, 1)]
                .into_iter()
                .map(|(i, seq)| (key(i), seq))
                .collect();
            assert_eq!(live, expected, "keys {step} apart");
        }
    }

    /// A first load planned on `planned` and written from the table `written` of `ctx`, its rows
    /// kept where `kept` (SQL) holds.
    async fn stage_first_load(
        ctx: &SessionContext,
        path: &Location,
        spec: &CdcSpec,
        planned: &DataFrame,
        kept: &str,
        written: &str,
        copy: LoadCopy,
    ) -> StagedLoad {
        let load = super::super::FirstLoad::plan(path, planned, spec, &TableOptions::default())
            .await
            .unwrap()
            .expect("each key once: written as computed");
        let streams = ctx
            .sql(&format!(
                "SELECT *, {kept} AS kept, {} AS delete FROM {written}",
                is_delete_sql(spec, "")
            ))
            .await
            .unwrap()
            .execute_stream_partitioned()
            .await
            .unwrap();
        load.write(streams, "kept", "delete", copy).await.unwrap()
    }

    /// Every file under `dir`, at any depth.
    fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walkdir(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[tokio::test]
    async fn a_batch_against_a_table_is_classified_on_its_keys_and_adds_whole_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(dir.path(), &[]);
        let ctx = super::super::session(None).unwrap();
        let first = changes(&ctx, &[(1, 1, "I", 0), (2, 1, "I", 1), (3, 1, "I", 2)]);
        apply_changes(&path, &ctx, first, &spec, &TableOptions::default(), &meta)
            .await
            .unwrap();

        // Key 1 updated twice in the batch (the later wins), 2 deleted, 3 re-delivered stale, 4 new.
        let ctx = super::super::session(None).unwrap();
        let scratch = Scratch::new(None).unwrap();
        let batch = changes(
            &ctx,
            &[
                (1, 2, "U", 10),
                (1, 3, "U", 11),
                (2, 2, "D", 1),
                (3, 1, "I", 2),
                (4, 1, "I", 12),
            ],
        );
        let prepared = prepare_changes(
            &path,
            &ctx,
            &scratch,
            batch,
            5,
            &spec,
            &TableOptions::default(),
            None,
        )
        .await
        .unwrap()
        .unwrap();
        // The comparison with the table holds no column it does not read.
        let classified = ctx.table(CLASSIFIED).await.unwrap();
        assert!(
            classified
                .schema()
                .field_with_unqualified_name("day")
                .is_err()
        );
        let added = ctx
            .sql(&format!("{} ORDER BY k", prepared.changed_sql()))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let added = datafusion::arrow::compute::concat_batches(&added[0].schema(), &added).unwrap();
        let column = |name: &str| {
            datafusion::arrow::compute::cast(added.column_by_name(name).unwrap(), &DataType::Utf8)
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(column("k"), ["1", "4"]);
        assert_eq!(column("seq"), ["3", "1"]);
        assert_eq!(column("day"), ["2020-01-12", "2020-01-13"]);
        let metrics = prepared.commit(&ctx, &meta).await.unwrap();
        assert_eq!(metrics.rows_stale, 1);
        assert_eq!(
            (
                metrics.write.rows_inserted,
                metrics.write.rows_updated,
                metrics.write.rows_deleted
            ),
            (1, 1, 1)
        );
    }

    /// The live rows of the table at `path`, `key:seq:day` in key order; read alike by delta-rs's
    /// provider and by medallion's (shares of the files side by side when they carry vectors).
    async fn live_rows(path: &Location) -> Vec<String> {
        let table = super::super::open(path).await.unwrap().unwrap();
        let plain = rows_of(table.table_provider().await.unwrap()).await;
        let ours = rows_of(super::super::provider(path, &table).await.unwrap()).await;
        assert_eq!(plain, ours);
        plain
    }

    async fn rows_of(provider: Arc<dyn datafusion::catalog::TableProvider>) -> Vec<String> {
        let ctx = super::super::session(None).unwrap();
        ctx.register_table("t", provider).unwrap();
        let batches = ctx
            .sql("SELECT CAST(k AS VARCHAR) || ':' || CAST(seq AS VARCHAR) || ':' || CAST(day AS VARCHAR) AS r FROM t ORDER BY k")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        batches
            .iter()
            .flat_map(|b| {
                let column =
                    datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                column
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The `add` actions of the table's current version.
    async fn live_adds(path: &Location) -> Vec<deltalake::kernel::Add> {
        let table = super::super::open(path).await.unwrap().unwrap();
        #[allow(deprecated)]
        table
            .snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| f.add_action())
            .collect()
    }

    #[tokio::test]
    async fn a_table_with_deletion_vectors_marks_changed_rows_and_ends_as_a_rewrite_does() {
        let batches: [&[(i64, i64, &str, i32)]; 4] = [
            &[
                (1, 1, "I", 0),
                (2, 1, "I", 1),
                (3, 1, "I", 2),
                (4, 1, "I", 3),
                (5, 1, "I", 4),
            ],
            // 1 updated, 2 deleted, 6 new.
            &[(1, 2, "U", 10), (2, 2, "D", 1), (6, 1, "I", 6)],
            // 1 again (its live row is now in the batch's new file), 3 updated, 1's old row stays
            // deleted, 4 deleted.
            &[(1, 3, "U", 11), (3, 2, "U", 12), (4, 2, "D", 3)],
            // Every row left of the first file: 5 deleted, 3 updated again (new file), the
            // first file then holds no live row.
            &[(5, 2, "D", 4), (3, 3, "U", 13)],
        ];
        let dir = tempfile::tempdir().unwrap();
        // Each table with tombstones of its own.
        let (dv_spec, dv_path, meta) = table_in(&dir.path().join("dv"), &[]);
        let (rewrite_spec, rewrite_path, _) = table_in(&dir.path().join("rewrite"), &[]);
        let with_vectors = TableOptions {
            deletion_vectors: true,
            ..TableOptions::default()
        };
        let mut versions = Vec::new();
        for (i, rows) in batches.iter().enumerate() {
            for (path, spec, options) in [
                (&dv_path, &dv_spec, &with_vectors),
                (&rewrite_path, &rewrite_spec, &TableOptions::default()),
            ] {
                let ctx = super::super::session(None).unwrap();
                let metrics = apply_changes(path, &ctx, changes(&ctx, rows), spec, options, &meta)
                    .await
                    .unwrap();
                if i == 1 {
                    assert_eq!(
                        (
                            metrics.write.rows_inserted,
                            metrics.write.rows_updated,
                            metrics.write.rows_deleted
                        ),
                        (1, 1, 1),
                        "{path}"
                    );
                }
            }
            let marked = live_rows(&dv_path).await;
            assert_eq!(marked, live_rows(&rewrite_path).await, "after batch {i}");
            versions.push(live_adds(&dv_path).await);
        }
        let table = super::super::open(&dv_path).await.unwrap().unwrap();
        assert!(super::super::deletion_vectors_enabled(&table));
        assert!(!super::super::deletion_vectors_enabled(
            &super::super::open(&rewrite_path).await.unwrap().unwrap()
        ));
        assert_eq!(
            live_rows(&dv_path).await,
            ["1:3:2020-01-12", "3:3:2020-01-14", "6:1:2020-01-07"]
        );
        // After batch 1 the first file is kept with a vector of its two changed rows, beside a new
        // file of the update and the insert.
        let first = &versions[0][0].path;
        let after = &versions[1];
        assert_eq!(after.len(), 2);
        let kept = after
            .iter()
            .find(|a| &a.path == first)
            .expect("first file kept");
        let vector = kept.deletion_vector.as_ref().expect("a deletion vector");
        assert_eq!(vector.cardinality, 2);
        assert!(
            kept.stats
                .as_deref()
                .unwrap()
                .contains("\"tightBounds\":false")
        );
        let file = dir.path().join("dv/table").join(format!(
            "deletion_vector_{}.bin",
            uuid::Uuid::from_slice(&z85::decode(&vector.path_or_inline_dv).unwrap()).unwrap()
        ));
        assert!(file.exists(), "{}", file.display());
        // After batch 2 the first file's vector holds its earlier rows and the two new ones.
        let kept = versions[2]
            .iter()
            .find(|a| &a.path == first)
            .expect("first file kept");
        assert_eq!(kept.deletion_vector.as_ref().unwrap().cardinality, 4);
        // After batch 3 no row of the first file is live: it is removed, not marked.
        assert!(versions[3].iter().all(|a| &a.path != first));
    }

    /// medallion reads a table with vectors through DataFusion's Parquet scan: filters skip pages by
    /// their statistics, and what is left agrees with delta-rs's reading and with the changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_with_deletion_vectors_is_read_with_its_filters_pushed_into_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let (spec, path, meta) = table_in(dir.path(), &[]);
        let options = TableOptions {
            deletion_vectors: true,
            ..TableOptions::default()
        };
        // 100,000 keys, a thousand a day over 100 days: one file of five pages a column.
        let first: Vec<(i64, i64, &str, i32)> = (0..100_000)
            .map(|k| (k, 1, "I", (k / 1000) as i32))
            .collect();
        // Every 7th key deleted, every 11th other key moved to day 200.
        let batch: Vec<(i64, i64, &str, i32)> = (0..100_000)
            .filter_map(|k| match (k % 7, k % 11) {
                (0, _) => Some((k, 2, "D", 0)),
                (_, 0) => Some((k, 2, "U", 200)),
                _ => None,
            })
            .collect();
        // One partition, so that the rows reach the file in the order of their days whatever the
        // machine's load: the pages skipped below depend on it.
        for rows in [&first, &batch] {
            let ctx = super::super::session(None).unwrap();
            let config = ctx.copied_config().with_target_partitions(1);
            let ctx = SessionContext::new_with_state(
                datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
                    .with_config(config)
                    .build(),
            );
            apply_changes(&path, &ctx, changes(&ctx, rows), &spec, &options, &meta)
                .await
                .unwrap();
        }
        let table = super::super::open(&path).await.unwrap().unwrap();
        assert!(
            live_adds(&path)
                .await
                .iter()
                .any(|a| a.deletion_vector.is_some())
        );
        let live = |k: i64| k % 7 != 0;
        let day = |k: i64| if k % 11 == 0 { 200 } else { k / 1000 };
        // (query, what the changes leave)
        let between = |low: i64, high: i64| {
            let keys: Vec<i64> = (0..100_000)
                .filter(|&k| live(k) && (low..high).contains(&day(k)))
                .collect();
            format!("{}:{}", keys.len(), keys.iter().sum::<i64>())
        };
        let cases = [
            (
                "SELECT CAST(COUNT(*) AS VARCHAR) FROM t".to_string(),
                (0..100_000).filter(|&k| live(k)).count().to_string(),
            ),
            (
                "SELECT COUNT(*) || ':' || SUM(k) FROM t \
                 WHERE day >= DATE '2020-01-31' AND day < DATE '2020-02-10'"
                    .to_string(),
                between(30, 40),
            ),
            (
                "SELECT COUNT(*) || ':' || SUM(k) FROM t WHERE day = DATE '2020-07-19'".to_string(),
                between(200, 201),
            ),
            (
                "SELECT COUNT(*) || ':' || SUM(k) FROM t WHERE k >= 99000".to_string(),
                {
                    let keys: Vec<i64> = (99_000..100_000).filter(|&k| live(k)).collect();
                    format!("{}:{}", keys.len(), keys.iter().sum::<i64>())
                },
            ),
        ];
        for (query, expected) in &cases {
            for provider in [
                table.table_provider().await.unwrap(),
                super::super::provider(&path, &table).await.unwrap(),
            ] {
                let ctx = super::super::session(None).unwrap();
                ctx.register_table("t", provider).unwrap();
                let batches = ctx.sql(query).await.unwrap().collect().await.unwrap();
                let got = datafusion::arrow::compute::cast(batches[0].column(0), &DataType::Utf8)
                    .unwrap()
                    .as_string::<i32>()
                    .value(0)
                    .to_string();
                assert_eq!(&got, expected, "{query}");
            }
        }
        // The scan of ten days of 100 gives out far fewer rows than the table holds: the pages of
        // other days were skipped, not read and filtered, where delta-rs 1.1 decodes every row of
        // a file with a vector.
        fn scanned(plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> usize {
            let own = if plan.children().is_empty() {
                plan.metrics().and_then(|m| m.output_rows()).unwrap_or(0)
            } else {
                0
            };
            own + plan.children().into_iter().map(scanned).sum::<usize>()
        }
        let mut read = Vec::new();
        for provider in [
            super::super::provider(&path, &table).await.unwrap(),
            table.table_provider().await.unwrap(),
        ] {
            let ctx = super::super::session(None).unwrap();
            ctx.register_table("t", provider).unwrap();
            let plan = ctx
                .sql("SELECT k FROM t WHERE day >= DATE '2020-01-31' AND day < DATE '2020-02-10'")
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx())
                .await
                .unwrap();
            read.push(scanned(&plan));
        }
        assert!(read[0] > 0 && read[0] < 40_000, "rows scanned: {read:?}");
        assert!(read[1] >= 85_000, "rows scanned: {read:?}");
    }

    #[test]
    fn a_batch_beside_marked_files_is_cut_in_as_many_ranges_as_it_touched_files() {
        let (spec, _, _) = table_in(std::path::Path::new("/tmp/unused"), &[]);
        let stats = super::super::files::FileStats {
            row_bytes: Some(16),
            rows: 10_000_000,
            key_bounds: Some((1, 10_000_000)),
        };
        let ranges = |rows: u64, files: usize| {
            beside(&spec, &TableOptions::default(), &None, &stats, rows, files)
                .ranges
                .map_or(0, |r| r.count())
        };
        // A million new rows beside ten files: ten ranges of about 1.6 MB.
        assert_eq!(ranges(1_000_000, 10), 10);
        // Ten thousand: files of 1 MiB at least, so one.
        assert_eq!(ranges(10_000, 10), 1);
        // A batch's own keys past the table's widen the ranges.
        let wide = beside(
            &spec,
            &TableOptions::default(),
            &Some(("1".into(), "20000000".into())),
            &stats,
            1_000_000,
            10,
        );
        assert_eq!(wide.ranges.map(|r| r.count()), Some(10));
        // No key bounds in the files' statistics: rows as they come.
        let unknown = super::super::files::FileStats {
            key_bounds: None,
            ..stats
        };
        assert!(
            beside(
                &spec,
                &TableOptions::default(),
                &None,
                &unknown,
                1_000_000,
                10
            )
            .ranges
            .is_none()
        );
    }

    #[test]
    fn newer_is_lexicographic() {
        assert_eq!(
            newer_predicate("s", "t", &["a".into(), "b".into()]),
            "(s.\"a\" > t.\"a\" OR (s.\"a\" = t.\"a\" AND s.\"b\" > t.\"b\"))"
        );
    }
}
