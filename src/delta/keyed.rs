//! Keyed refresh: a stage whose rows each come from one row of its cdc source, keyed by the source's
//! key (`incremental: { key: ... }`; the reference pipeline's `gold.fact_transactions`, one fact per
//! live transaction), recomputes after a change batch only the rows of the keys the batch changed. The
//! rows it replaces, and those whose key is gone from the source, are marked deleted with deletion
//! vectors ([`super::deletion_vectors`]); the new rows go to new files. A batch then costs its own rows
//! and a read of the target's key column, not a rebuild of the table; for a batch over few of the
//! source's files, only in the target's files whose key range holds a key it replaces or deletes.
//!
//! What changed is read from the source's log, not from a record the batch kept: every row version
//! written after the stage's last success is in a file added since, so the live rows of those files
//! are the ones to recompute, and a row of the target whose key is no longer live in the source is
//! one to delete. Those keys are the ones live before in the files the batch removed or marked and
//! live nowhere now ([`Gone::Deleted`]), read from those files alone when they hold at most half the
//! source's rows; otherwise every live key is read instead ([`Gone::NotLive`]), which costs the
//! table once rather than most of it twice. A compaction of the source since then only recomputes
//! rows that did not change; a file whose deletion vector no longer deletes every row it did (after a
//! restore, or a clone of an older version) has its live rows recomputed as if it were added. That is
//! read from the vectors themselves, not from the name of the operation that wrote them.

use std::{collections::HashMap, sync::Arc};

use datafusion::{
    catalog::TableProvider,
    logical_expr::{Expr, LogicalPlan},
    prelude::{DataFrame, SessionContext},
};
use deltalake::{
    DeltaTable,
    kernel::{Action, DeletionVectorDescriptor, transaction::CommitProperties},
    protocol::{DeltaOperation, MergePredicate},
};

use super::{CommitMeta, DeltaError, WriteMetrics, files, quote};
use crate::{
    engine::udf::repeated::{KeySet, is_integer_key, key_in_set},
    storage::Location,
};

/// Registered for a candidate's checks: whether a key is live in the source.
pub const LIVE_KEY: &str = "__medallion_live_key";
/// Registered for a candidate's checks: whether a key was deleted from the source.
pub const DELETED_KEY: &str = "__medallion_deleted_key";
/// Registered for a candidate's checks: whether a key's row is recomputed.
pub const REPLACED_KEY: &str = "__medallion_replaced_key";

/// What a keyed refresh recomputes and deletes.
#[derive(Debug)]
pub struct KeyedScope {
    /// The target's column holding the source's key.
    pub key: String,
    /// The source's files whose live rows are recomputed (scan ids): those added since the stage's
    /// last success.
    pub added: Vec<String>,
    /// The source's keys of those rows: their rows in the target are replaced.
    pub replaced: Arc<KeySet>,
    /// The keys whose rows in the target are deleted, besides those replaced.
    pub gone: Gone,
    /// How many keys `replaced` holds.
    pub replaced_count: usize,
    /// The live rows of the `added` files, `None` when there are none: what the stage's SQL reads.
    pub added_rows: Option<Arc<dyn TableProvider>>,
    /// The whole source, as its checks read it.
    pub source: Arc<dyn TableProvider>,
}

/// The source's keys gone since the stage's last success, as a refresh reads them.
#[derive(Debug)]
pub enum Gone {
    /// Every key live in the source: a row of the target with another key is deleted.
    NotLive(Arc<KeySet>),
    /// The keys live before in the files the batch removed or marked, and live nowhere now.
    Deleted(Arc<KeySet>),
}

impl KeyedScope {
    /// Whether the target's row of `key` goes: replaced, or its key gone from the source.
    pub fn gone(&self, key: i64) -> bool {
        self.replaced.contains(key)
            || match &self.gone {
                Gone::NotLive(live) => !live.contains(key),
                Gone::Deleted(deleted) => deleted.contains(key),
            }
    }

    /// Registers [`REPLACED_KEY`] and [`LIVE_KEY`] or [`DELETED_KEY`] in `ctx`, and gives the SQL of
    /// the target's rows that stay: `target`'s rows whose key is neither gone nor replaced.
    pub fn kept_sql(&self, ctx: &SessionContext, target: &str, columns: &str) -> String {
        ctx.register_udf(key_in_set(REPLACED_KEY, self.replaced.clone()));
        let key = quote(&self.key);
        let not_gone = match &self.gone {
            Gone::NotLive(live) => {
                ctx.register_udf(key_in_set(LIVE_KEY, live.clone()));
                format!("{LIVE_KEY}({key})")
            }
            Gone::Deleted(deleted) => {
                ctx.register_udf(key_in_set(DELETED_KEY, deleted.clone()));
                format!("NOT {DELETED_KEY}({key})")
            }
        };
        // A row without a key is never marked (no source row has none): it stays, as here.
        format!(
            "SELECT {columns} FROM {target} \
             WHERE {key} IS NULL OR ({not_gone} AND NOT {REPLACED_KEY}({key}))"
        )
    }

    /// The target `table`'s files (at `path`) split by their least and greatest key: `whole`, those
    /// holding no key this refresh replaces or deletes, which [`write`] leaves as they are; `cut`,
    /// the others. `None` when every file may hold one (any key not live goes).
    pub fn split_files(
        &self,
        path: &Location,
        table: &DeltaTable,
    ) -> Result<Option<super::FileSplit>, DeltaError> {
        let Gone::Deleted(deleted) = &self.gone else {
            return Ok(None);
        };
        let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
        let root = files::root_url(table);
        let mut split = super::FileSplit {
            whole: Vec::new(),
            cut: Vec::new(),
        };
        for view in snapshot.log_data() {
            let id = files::scan_id(path, &root, &view.path())?.to_string();
            // Without bounds (no statistics, or every key NULL), a file is cut.
            let may_hold = files::key_bounds(&view, &self.key).is_none_or(|(low, high)| {
                self.replaced.any_within(low, high) || deleted.any_within(low, high)
            });
            match may_hold {
                true => split.cut.push(id),
                false => split.whole.push(id),
            }
        }
        Ok(Some(split))
    }
}

/// The scope of a keyed refresh of a stage last run when `source` (at `path`) was at version `after`,
/// its key column `source_key` held in the target's `key`; `None` when the change cannot be told
/// from the log (that version gone, the table replaced by another): the stage is then rebuilt.
pub async fn scope(
    path: &Location,
    source: &DeltaTable,
    after: u64,
    source_key: &str,
    key: &str,
) -> Result<Option<KeyedScope>, DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let mut before = source.clone();
    if let Err(error) = before.load_version(after).await {
        tracing::warn!(table = %path, "version {after} cannot be read ({error}): rebuilt in full");
        return Ok(None);
    }
    let (Ok(now), Ok(then)) = (source.snapshot(), before.snapshot()) else {
        return Ok(None);
    };
    // Another table, or the same one with other columns (a restore can bring back old ones): the
    // files no longer tell what changed.
    if now.metadata().id() != then.metadata().id() || now.schema() != then.schema() {
        return Ok(None);
    }
    // What changed is told by the two versions' files, whatever the commits between them were.
    #[allow(deprecated)] // delta-rs 1.1's way to a file's whole `add`, its vector included
    let mut files_then: HashMap<String, (Option<DeletionVectorDescriptor>, Option<u64>)> = then
        .log_data()
        .into_iter()
        .map(|view| {
            let vector = view.add_action().deletion_vector;
            let live = live_rows(view.num_records(), vector.as_ref());
            (view.path().to_string(), (vector, live))
        })
        .collect();
    let root = files::root_url(source);
    let mut added = Vec::new();
    // Files whose vector changed and did not shrink: read to tell whether it still deletes every
    // row it did (it grew) or not (a restore or a clone brought some back).
    let mut to_read = Vec::new();
    // The files whose live rows then may hold keys gone now (scan ids): those removed, and those
    // whose vector changed.
    let mut changed = Vec::new();
    // Live rows: now in every file, then in the `changed` files (`None`: a file without a count).
    let mut rows_now = Some(0u64);
    let mut rows_changed = Some(0u64);
    let sum = |total: &mut Option<u64>, rows: Option<u64>| {
        *total = total.zip(rows).map(|(total, rows)| total + rows);
    };
    // Files whose vector grew: some of their rows were deleted, the rest are live as they were.
    let mut grown = Vec::new();
    for view in now.log_data() {
        let file = view.path().to_string();
        #[allow(deprecated)]
        let vector = view.add_action().deletion_vector;
        sum(
            &mut rows_now,
            live_rows(view.num_records(), vector.as_ref()),
        );
        let id = files::scan_id(path, &root, &file)?.to_string();
        let Some((old, live_then)) = files_then.remove(&file) else {
            added.push(id);
            continue;
        };
        let marked = old != vector;
        if marked {
            sum(&mut rows_changed, live_then);
            changed.push(id.clone());
        }
        match vector_change(old.as_ref(), vector.as_ref()) {
            // A first vector: it only deletes.
            VectorChange::Same if marked => grown.push(id),
            VectorChange::Same => {}
            VectorChange::Restored => added.push(id),
            VectorChange::Changed => match (old, vector) {
                (Some(old), Some(new)) => to_read.push((id, old, new)),
                _ => added.push(id),
            },
        }
    }
    // What is left of the files then was removed since.
    for (file, (_, live_then)) in files_then {
        sum(&mut rows_changed, live_then);
        changed.push(files::scan_id(path, &root, &file)?.to_string());
    }
    let storage = source.log_store().engine(None).storage_handler();
    for (id, kept) in still_deleted(storage, root, to_read).await {
        match kept {
            Ok(true) => grown.push(id),
            Ok(false) => added.push(id),
            Err(message) => {
                // The old vector vacuumed, most likely: its file's rows are recomputed, which is
                // always right, and slower (said, in case the cause is the storage).
                tracing::warn!(
                    table = %path,
                    "a deletion vector of `{id}` not read ({message}): its rows are recomputed"
                );
                added.push(id);
            }
        }
    }
    let ctx = super::session(None)?;
    let whole = super::provider(path, source).await?;
    let stored = whole
        .schema()
        .field_with_name(source_key)
        .map(|f| f.data_type().clone())
        .map_err(|e| DeltaError::query(path, e.into()))?;
    if !is_integer_key(&stored) {
        return Err(DeltaError::Invalid {
            table: path.to_string(),
            message: format!("`incremental.key` needs an integer key; `{source_key}` is {stored}"),
        });
    }
    let (replaced, replaced_count, added_rows) = if added.is_empty() {
        (KeySet::Sorted(Vec::new()), 0, None)
    } else {
        let provider = added_provider(path, source, &added).await?;
        let keys = keys_of(&ctx, provider.clone(), source_key)
            .await
            .map_err(query)?;
        let count = keys.len();
        (keys.into_set(), count, Some(provider))
    };
    let replaced = Arc::new(replaced);
    // Reading the changed files costs their rows then, and again now for those that grew.
    let few_changed = rows_changed
        .zip(rows_now)
        .is_some_and(|(changed, now)| changed.saturating_mul(2) <= now);
    let deleted = if few_changed {
        let changes = Changes {
            path,
            then: &before,
            now: source,
            changed: &changed,
            grown: &grown,
        };
        match changes.deleted_keys(&ctx, source_key, &replaced).await {
            Ok(deleted) => Some(deleted),
            // A file of the old version vacuumed, most likely: every live key tells it too.
            Err(error) => {
                tracing::warn!(
                    table = %path,
                    "the files changed since version {after} not read ({error}): every live key is"
                );
                None
            }
        }
    } else {
        None
    };
    tracing::debug!(
        table = %path,
        changed_files = changed.len(),
        ?rows_changed,
        ?rows_now,
        from_changed_files = deleted.is_some(),
        "keys gone since version {after}"
    );
    let gone = match deleted {
        Some(deleted) => Gone::Deleted(Arc::new(deleted)),
        None => Gone::NotLive(Arc::new(
            keys_of(&ctx, whole.clone(), source_key)
                .await
                .map_err(query)?
                .into_set(),
        )),
    };
    Ok(Some(KeyedScope {
        key: key.to_string(),
        added,
        replaced,
        gone,
        replaced_count,
        added_rows,
        source: whole,
    }))
}

/// The rows a file keeps: `records` less those its vector deletes (`None` without a count).
fn live_rows(records: Option<usize>, vector: Option<&DeletionVectorDescriptor>) -> Option<u64> {
    let deleted = vector.map_or(0, |v| v.cardinality.max(0) as u64);
    records.map(|records| (records as u64).saturating_sub(deleted))
}

/// The files of a source that changed between two of its versions (scan ids).
struct Changes<'a> {
    path: &'a Location,
    then: &'a DeltaTable,
    now: &'a DeltaTable,
    /// Files of `then` removed since, or whose deletion vector changed.
    changed: &'a [String],
    /// Files of both whose vector grew: of their rows live then, those still live now are not gone.
    grown: &'a [String],
}

impl Changes<'_> {
    /// The keys live in `changed` then and live nowhere now: not `replaced` (the keys of every row
    /// live now that was not then), and not in the rows of `grown` files still live. A key is live in
    /// one row at most (the source is written by a `cdc` stage), so a file unchanged since cannot hold
    /// one of them. Unlike [`Gone::NotLive`], a target row whose key was not live then either stays:
    /// the target holds none after a refresh from that version.
    async fn deleted_keys(
        &self,
        ctx: &SessionContext,
        key: &str,
        replaced: &Arc<KeySet>,
    ) -> Result<KeySet, DeltaError> {
        let query = |e| DeltaError::query(self.path, e);
        if self.changed.is_empty() {
            return Ok(KeySet::Sorted(Vec::new()));
        }
        let column = datafusion::prelude::ident(key);
        let not_in = |name: &str, keys: Arc<KeySet>| {
            datafusion::prelude::not(key_in_set(name, keys).call(vec![column.clone()]))
        };
        let mut frame = ctx
            .read_table(self.files(self.then, self.changed).await?)
            .and_then(|frame| frame.select(vec![column.clone()]))
            .and_then(|frame| frame.filter(not_in(REPLACED_KEY, replaced.clone())))
            .map_err(query)?;
        if !self.grown.is_empty() {
            let still = self.files(self.now, self.grown).await?;
            let still = keys_of(ctx, still, key).await.map_err(query)?.into_set();
            frame = frame
                .filter(not_in("__medallion_still_live", Arc::new(still)))
                .map_err(query)?;
        }
        let keys = super::cdc::collect_keys(frame).await.map_err(query)?;
        Ok(keys.into_set())
    }

    /// The live rows of the files `ids` of `table`, as [`super::provider`] reads a table.
    async fn files(
        &self,
        table: &DeltaTable,
        ids: &[String],
    ) -> Result<Arc<dyn TableProvider>, DeltaError> {
        if let Some(scan) = super::vector_scan::scan_files(self.path, table, Some(ids)).await? {
            return Ok(scan);
        }
        added_provider(self.path, table, ids).await
    }
}

/// The values of the integer column `key` of `provider`'s rows.
async fn keys_of(
    ctx: &SessionContext,
    provider: Arc<dyn TableProvider>,
    key: &str,
) -> datafusion::error::Result<crate::engine::udf::repeated::Keys> {
    let frame = ctx.read_table(provider)?.select_columns(&[key])?;
    super::cdc::collect_keys(frame).await
}

/// How a file's deletion vector changed between two versions of its table.
#[derive(Debug, PartialEq)]
enum VectorChange {
    /// The same vector, or none then: no row is live now that was not then.
    Same,
    /// Some rows deleted then are not now (the vector went, or holds fewer rows): a restore.
    Restored,
    /// Another vector with as many rows or more: grown (as a table's vectors change without a
    /// restore), or not; read both to know.
    Changed,
}

/// What the log tells of a file whose deletion vector went from `old` to `new`, without reading them.
fn vector_change(
    old: Option<&DeletionVectorDescriptor>,
    new: Option<&DeletionVectorDescriptor>,
) -> VectorChange {
    match (old, new) {
        (None, _) => VectorChange::Same,
        (Some(_), None) => VectorChange::Restored,
        (Some(old), Some(new)) if old == new => VectorChange::Same,
        (Some(old), Some(new)) if new.cardinality < old.cardinality => VectorChange::Restored,
        (Some(_), Some(_)) => VectorChange::Changed,
    }
}

/// For each file of `pairs` (its scan id, its old vector and its new one, in the table at `root`),
/// whether the new vector deletes every row the old one did; an error for a file whose vectors
/// cannot be read (vacuumed). Each vector file is read once, from `storage`: the kernel reads a
/// vector's whole file for every vector, and a batch stores the vectors of all the files it marks
/// in one file, so that reading them one by one fetched it once per file (twice, old and new).
async fn still_deleted(
    storage: Arc<dyn delta_kernel::StorageHandler>,
    root: url::Url,
    pairs: Vec<(String, DeletionVectorDescriptor, DeletionVectorDescriptor)>,
) -> Vec<(String, Result<bool, String>)> {
    use delta_kernel::actions::deletion_vector::DeletionVectorDescriptor as Vector;
    if pairs.is_empty() {
        return Vec::new();
    }
    let ids: Vec<String> = pairs.iter().map(|(id, _, _)| id.clone()).collect();
    let read = tokio::task::spawn_blocking(move || {
        // Each file's two vectors, as the kernel reads them.
        type Both = Result<(Vector, Vector), String>;
        let vectors: Vec<(String, Both)> = pairs
            .into_iter()
            .map(|(id, old, new)| {
                let both = Vector::try_from(old)
                    .and_then(|old| Ok((old, Vector::try_from(new)?)))
                    .map_err(|e| e.to_string());
                (id, both)
            })
            .collect();
        let files: std::collections::BTreeSet<url::Url> = vectors
            .iter()
            .filter_map(|(_, both)| both.as_ref().ok())
            .flat_map(|(old, new)| [old.absolute_path(&root), new.absolute_path(&root)])
            .filter_map(|url| url.ok().flatten())
            .collect();
        let read = ReadOnce::read(storage.as_ref(), files);
        let storage: Arc<dyn delta_kernel::StorageHandler> = Arc::new(read);
        vectors
            .into_iter()
            .map(|(id, both)| {
                let kept = both.and_then(|(old, new)| {
                    let old = old
                        .read(storage.clone(), &root)
                        .map_err(|e| e.to_string())?;
                    let new = new
                        .read(storage.clone(), &root)
                        .map_err(|e| e.to_string())?;
                    Ok(old.is_subset(&new))
                });
                (id, kept)
            })
            .collect()
    })
    .await;
    read.unwrap_or_else(|error| {
        let message = error.to_string();
        ids.into_iter()
            .map(|id| (id, Err(message.clone())))
            .collect()
    })
}

/// The kernel's storage for reading deletion vectors, serving files read once beforehand, or the
/// error reading each gave; a file not asked for is not found.
struct ReadOnce(HashMap<url::Url, Result<bytes::Bytes, String>>);

impl ReadOnce {
    /// Reads `files` from `storage`, in one request (answered in order).
    fn read(
        storage: &dyn delta_kernel::StorageHandler,
        files: std::collections::BTreeSet<url::Url>,
    ) -> Self {
        let slices: Vec<delta_kernel::FileSlice> =
            files.iter().map(|url| (url.clone(), None)).collect();
        let read = match storage.read_files(slices) {
            Ok(read) => {
                let mut read = read.map(|bytes| bytes.map_err(|e| e.to_string()));
                files
                    .into_iter()
                    .map(|url| {
                        let bytes = read
                            .next()
                            .unwrap_or_else(|| Err("the storage gave no bytes".into()));
                        (url, bytes)
                    })
                    .collect()
            }
            Err(error) => files
                .into_iter()
                .map(|url| (url, Err(error.to_string())))
                .collect(),
        };
        ReadOnce(read)
    }
}

impl delta_kernel::StorageHandler for ReadOnce {
    fn read_files(
        &self,
        files: Vec<delta_kernel::FileSlice>,
    ) -> delta_kernel::DeltaResult<Box<dyn Iterator<Item = delta_kernel::DeltaResult<bytes::Bytes>>>>
    {
        let read: Vec<_> = files
            .into_iter()
            .map(|(url, range)| {
                let bytes = match self.0.get(&url) {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(error)) => {
                        return Err(delta_kernel::Error::generic(format!("{url}: {error}")));
                    }
                    None => return Err(delta_kernel::Error::file_not_found(&url)),
                };
                match range {
                    None => Ok(bytes.clone()),
                    Some(range) => usize::try_from(range.start)
                        .ok()
                        .zip(usize::try_from(range.end).ok())
                        .filter(|(start, end)| start <= end && *end <= bytes.len())
                        .map(|(start, end)| bytes.slice(start..end))
                        .ok_or_else(|| {
                            delta_kernel::Error::generic(format!("{url}: {range:?} out of bounds"))
                        }),
                }
            })
            .collect();
        Ok(Box::new(read.into_iter()))
    }

    fn list_from(
        &self,
        path: &url::Url,
    ) -> delta_kernel::DeltaResult<
        Box<dyn Iterator<Item = delta_kernel::DeltaResult<delta_kernel::FileMeta>>>,
    > {
        Err(delta_kernel::Error::unsupported(format!("listing {path}")))
    }

    fn copy_atomic(&self, _: &url::Url, dest: &url::Url) -> delta_kernel::DeltaResult<()> {
        Err(delta_kernel::Error::unsupported(format!("writing {dest}")))
    }

    fn put(&self, path: &url::Url, _: bytes::Bytes, _: bool) -> delta_kernel::DeltaResult<()> {
        Err(delta_kernel::Error::unsupported(format!("writing {path}")))
    }

    fn head(&self, path: &url::Url) -> delta_kernel::DeltaResult<delta_kernel::FileMeta> {
        Err(delta_kernel::Error::unsupported(format!("head of {path}")))
    }

    fn delete(&self, path: &url::Url) -> delta_kernel::DeltaResult<()> {
        Err(delta_kernel::Error::unsupported(format!("deleting {path}")))
    }
}

/// The source's rows of the files `added` (scan ids, not empty), their deletion vectors applied.
async fn added_provider(
    path: &Location,
    source: &DeltaTable,
    added: &[String],
) -> Result<Arc<dyn TableProvider>, DeltaError> {
    let provider = source
        .table_provider()
        .with_file_paths(added.iter().cloned())
        .build()
        .await
        .map_err(|e| DeltaError::query(path, e))?;
    Ok(Arc::new(provider))
}

/// Checks that `plan` (a stage's SQL over `source`) gives at most one row per row of `source`, its
/// `key` an integer, and
/// its column `key` unchanged from `source`'s column `source_key`: no join, aggregate, window, limit,
/// union or subquery, only projections, filters and sorts over one scan of `source`.
pub fn check_row_wise(
    plan: &LogicalPlan,
    source: &str,
    source_key: &str,
    key: &str,
) -> Result<(), String> {
    let key_type = plan
        .schema()
        .field_with_unqualified_name(key)
        .map(|f| f.data_type().clone())
        .map_err(|_| format!("its result has no column `{key}`"))?;
    if !is_integer_key(&key_type) {
        return Err(format!("`{key}` must be an integer, not {key_type}"));
    }
    let mut node = plan;
    let mut column = key.to_string();
    loop {
        node = match node {
            LogicalPlan::Projection(projection) => {
                let index = projection
                    .schema
                    .fields()
                    .iter()
                    .position(|f| f.name() == &column)
                    .ok_or_else(|| format!("its result has no column `{column}`"))?;
                match projection.expr.get(index).map(unaliased) {
                    Some(Expr::Column(c)) => column = c.name.clone(),
                    _ => {
                        return Err(format!(
                            "`{key}` must be `{source_key}` of `{source}` as it is, not computed"
                        ));
                    }
                }
                &projection.input
            }
            LogicalPlan::Filter(filter) => &filter.input,
            LogicalPlan::SubqueryAlias(alias) => &alias.input,
            LogicalPlan::Sort(sort) if sort.fetch.is_none() => &sort.input,
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.to_string();
                if name != source {
                    return Err(format!("it reads `{name}`, not only `{source}`"));
                }
                if scan.fetch.is_some() {
                    return Err("it limits its rows".into());
                }
                if scan
                    .projected_schema
                    .field_with_unqualified_name(&column)
                    .is_err()
                {
                    return Err(format!("its result has no column `{column}`"));
                }
                if column != source_key {
                    return Err(format!(
                        "`{key}` must be `{source_key}` of `{source}`, not `{column}`"
                    ));
                }
                return Ok(());
            }
            other => {
                return Err(format!(
                    "it is not one row per row of `{source}` ({})",
                    other.display()
                ));
            }
        };
    }
}

/// Checks that `plan` (a stage's SQL, before optimization folds `now()` into a literal) calls no
/// function whose value may change between runs: a row computed on one run and kept on the next
/// would then differ from the same row computed again.
pub fn check_immutable(plan: &LogicalPlan) -> Result<(), String> {
    use datafusion::{
        common::tree_node::{TreeNode, TreeNodeRecursion},
        logical_expr::Volatility,
    };
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    found = Some(f.func.name().to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })
    .map_err(|e| e.to_string())?;
    match found {
        Some(name) => Err(format!(
            "`{name}()` may give another value on another run, and rows computed before would keep \
             the old one"
        )),
        None => Ok(()),
    }
}

/// `expr` without its aliases.
fn unaliased(mut expr: &Expr) -> &Expr {
    while let Expr::Alias(alias) = expr {
        expr = &alias.expr;
    }
    expr
}

/// Whether `schema` (a stage's output) is the schema of `table`'s rows: the same columns in the same
/// order, of the same types. Otherwise new rows cannot join the old files: the stage is rebuilt.
pub fn keeps_schema(table: &DeltaTable, schema: &datafusion::arrow::datatypes::Schema) -> bool {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    let Ok(snapshot) = table.snapshot() else {
        return false;
    };
    let stored: Result<datafusion::arrow::datatypes::Schema, _> =
        snapshot.schema().as_ref().try_into_arrow();
    let Ok(stored) = stored else {
        return false;
    };
    super::same_columns(&stored, schema)
}

/// Writes a keyed refresh of `table` (at `path`, as the stage read it): the rows of `output` as new
/// files, and deletion vectors marking the rows `scope` says are gone. One commit, which fails if
/// another writer changed the table since; nothing is visible before it.
pub async fn write(
    path: &Location,
    table: &DeltaTable,
    output: DataFrame,
    scope: &KeyedScope,
    target_file_size: Option<u64>,
    meta: &CommitMeta,
) -> Result<WriteMetrics, DeltaError> {
    let query = |e| DeltaError::query(path, e);
    let files = files_to_read(path, table, scope)?;
    // The deletion vectors of the files read.
    let kept = match &files {
        Some(files) if files.is_empty() => HashMap::new(),
        _ => {
            let provider = match &files {
                Some(files) => table
                    .table_provider()
                    .with_file_paths(files.iter().cloned()),
                None => table.table_provider(),
            };
            let provider = provider.build().await.map_err(query)?;
            let ctx = super::session(None)?;
            super::deletion_vectors::kept_rows(&provider, &ctx)
                .await
                .map_err(query)?
        }
    };
    let gone = |key: i64| scope.gone(key);
    let marked = super::deletion_vectors::mark_where(
        path,
        table,
        files.as_ref(),
        &kept,
        &scope.key,
        &gone,
        None,
    )
    .await?;
    let layout = files::Layout::unclustered(target_file_size);
    let written = match files::write_files(path, table, output, &layout).await {
        Ok(written) => written,
        Err(error) => {
            marked.discard(path, table).await;
            return Err(error);
        }
    };
    let files_added = written.adds.len() as u64;
    let mut actions = marked.actions;
    actions.extend(written.adds.into_iter().map(Action::Add));
    if actions.is_empty() {
        // Nothing replaced, deleted or added (the source's commits changed no row of it).
        return Ok(WriteMetrics {
            version: table.version(),
            ..WriteMetrics::default()
        });
    }
    let operation = DeltaOperation::Merge {
        // No predicate: the commit conflicts with any concurrent change to the table.
        predicate: None,
        merge_predicate: Some(format!("refresh of the changed `{}` values", scope.key)),
        matched_predicates: vec![MergePredicate {
            action_type: "delete".into(),
            predicate: Some("the key was changed or deleted in the source".into()),
        }],
        not_matched_predicates: vec![MergePredicate {
            action_type: "insert".into(),
            predicate: Some("the key's row as recomputed".into()),
        }],
        not_matched_by_source_predicates: Vec::new(),
    };
    let properties: CommitProperties = meta.properties();
    let version = files::commit(path, table, actions, operation, properties).await?;
    Ok(WriteMetrics {
        version: Some(version),
        rows_source: None,
        rows_written: written.rows,
        rows_inserted: written.rows,
        rows_updated: 0,
        rows_deleted: marked.rows,
        files_added,
    })
}

/// The files of the target `table` (scan ids) that may hold a row `scope` says goes, by the least
/// and greatest key in their statistics; `None`: every file may (any key not live goes).
fn files_to_read(
    path: &Location,
    table: &DeltaTable,
    scope: &KeyedScope,
) -> Result<Option<std::collections::HashSet<String>>, DeltaError> {
    Ok(scope
        .split_files(path, table)?
        .map(|split| split.cut.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::{
        arrow::datatypes::{DataType, Field, Schema},
        datasource::MemTable,
    };

    /// The plan of `sql` over an empty `silver.transactions` and `silver.cards`, before and after
    /// optimization.
    async fn plan(sql: &str) -> (LogicalPlan, LogicalPlan) {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("dms_id", DataType::Int64, true),
            Field::new("card_id", DataType::Int64, true),
            Field::new("amount", DataType::Int64, true),
        ]));
        for name in ["silver.transactions", "silver.cards"] {
            let table = MemTable::try_new(schema.clone(), vec![vec![]]).unwrap();
            let name = crate::config::TableName::parse(name).unwrap();
            crate::engine::register_table(&ctx, &name, Arc::new(table), None).unwrap();
        }
        let frame = ctx.sql(sql).await.unwrap();
        (
            frame.logical_plan().clone(),
            frame.into_optimized_plan().unwrap(),
        )
    }

    async fn check(sql: &str) -> Result<(), String> {
        let (unoptimized, optimized) = plan(sql).await;
        check_immutable(&unoptimized)?;
        check_row_wise(
            &optimized,
            "silver.transactions",
            "dms_id",
            "transaction_id",
        )
    }

    #[tokio::test]
    async fn projections_filters_and_sorts_of_the_source_with_its_key_are_row_wise() {
        for sql in [
            "SELECT dms_id AS transaction_id, amount * 2 AS twice FROM silver.transactions",
            "SELECT dms_id AS transaction_id FROM silver.transactions WHERE amount > 0",
            "SELECT t.dms_id AS transaction_id, t.amount FROM silver.transactions t ORDER BY amount",
            "SELECT transaction_id FROM (SELECT dms_id AS transaction_id FROM silver.transactions)",
        ] {
            assert_eq!(check(sql).await, Ok(()), "{sql}");
        }
    }

    #[tokio::test]
    async fn joins_aggregates_limits_and_a_computed_or_other_key_are_not() {
        for (sql, says) in [
            (
                "SELECT dms_id AS transaction_id, COUNT(*) AS n FROM silver.transactions \
                 GROUP BY dms_id",
                "not one row per row",
            ),
            (
                "SELECT t.dms_id AS transaction_id FROM silver.transactions t \
                 JOIN silver.cards c ON t.card_id = c.card_id",
                "not one row per row",
            ),
            (
                "SELECT dms_id AS transaction_id FROM silver.transactions LIMIT 5",
                "",
            ),
            (
                "SELECT dms_id + 1 AS transaction_id FROM silver.transactions",
                "not computed",
            ),
            (
                "SELECT card_id AS transaction_id FROM silver.transactions",
                "not `card_id`",
            ),
            (
                "SELECT dms_id AS transaction_id FROM silver.cards",
                "not only `silver.transactions`",
            ),
            ("SELECT dms_id FROM silver.transactions", "no column"),
            (
                "SELECT dms_id AS transaction_id, now() AS seen FROM silver.transactions",
                "`now()` may give another value",
            ),
            (
                "SELECT DISTINCT dms_id AS transaction_id FROM silver.transactions",
                "not one row per row",
            ),
        ] {
            let error = check(sql).await.expect_err(sql);
            assert!(error.contains(says), "{sql}: {error}");
        }
    }

    /// Keys `keys` as a batch of column `k`.
    fn keys(keys: impl IntoIterator<Item = i64>) -> datafusion::arrow::array::RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let column = datafusion::arrow::array::Int64Array::from_iter_values(keys);
        datafusion::arrow::array::RecordBatch::try_new(schema, vec![Arc::new(column)]).unwrap()
    }

    /// A source of key `k` created with deletion vectors, in ten files of a hundred keys each
    /// (0–99, 100–199, …); its version.
    async fn source(path: &Location) -> u64 {
        let options = super::super::TableOptions {
            deletion_vectors: true,
            ..Default::default()
        };
        for file in 0..10 {
            let batch = keys(file * 100..file * 100 + 100);
            super::super::append_batches(path, vec![batch], &options, &CommitMeta::default())
                .await
                .unwrap();
        }
        super::super::open(path)
            .await
            .unwrap()
            .unwrap()
            .version()
            .unwrap()
    }

    /// Marks the rows of `gone` deleted, with deletion vectors, as a cdc batch does.
    async fn mark_deleted(path: &Location, gone: &[i64]) {
        let table = super::super::open(path).await.unwrap().unwrap();
        let provider = table.table_provider().build().await.unwrap();
        let ctx = super::super::session(None).unwrap();
        let kept = super::super::deletion_vectors::kept_rows(&provider, &ctx)
            .await
            .unwrap();
        let contains = |key: i64| gone.contains(&key);
        let expected = Some(gone.len() as u64);
        let marked = super::super::deletion_vectors::mark_where(
            path, &table, None, &kept, "k", &contains, expected,
        )
        .await
        .unwrap();
        let delete = DeltaOperation::Delete { predicate: None };
        files::commit(path, &table, marked.actions, delete, Default::default())
            .await
            .unwrap();
    }

    /// Rewrites the file holding key `first` without key `gone`, as a copy-on-write batch does; the
    /// path of the file removed.
    async fn rewrite_without(path: &Location, first: i64, gone: i64) -> String {
        let options = super::super::TableOptions::default();
        let rest = keys((first..first + 100).filter(|k| *k != gone));
        super::super::append_batches(path, vec![rest], &options, &CommitMeta::default())
            .await
            .unwrap();
        let table = super::super::open(path).await.unwrap().unwrap();
        let snapshot = table.snapshot().unwrap();
        let old = snapshot
            .log_data()
            .into_iter()
            .find(|view| {
                let stats: serde_json::Value =
                    serde_json::from_str(&view.stats().unwrap()).unwrap();
                stats["minValues"]["k"] == first && stats["numRecords"] == 100
            })
            .unwrap();
        let removed = old.path().to_string();
        let remove = Action::Remove(old.remove_action(true));
        let delete = DeltaOperation::Delete { predicate: None };
        files::commit(path, &table, vec![remove], delete, Default::default())
            .await
            .unwrap();
        removed
    }

    /// Which of `keys` [`KeyedScope::gone`] says go.
    fn gone_keys(scope: &KeyedScope, keys: impl Iterator<Item = i64>) -> Vec<i64> {
        keys.filter(|k| scope.gone(*k)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_keys_gone_are_read_from_the_files_a_batch_changed_unless_they_hold_half_the_rows()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::local(dir.path().join("source"));
        let after = source(&path).await;
        // A batch deleting 5 and 6 (marked), updating 250 (marked, and added again) and inserting
        // 5000; then a copy-on-write batch deleting 150 (its file rewritten without it).
        mark_deleted(&path, &[5, 6, 250]).await;
        let options = super::super::TableOptions::default();
        super::super::append_batches(
            &path,
            vec![keys([250, 5000])],
            &options,
            &CommitMeta::default(),
        )
        .await
        .unwrap();
        let removed = rewrite_without(&path, 100, 150).await;
        let now = super::super::open(&path).await.unwrap().unwrap();
        let scope = scope(&path, &now, after, "k", "k").await.unwrap().unwrap();
        // Three files of the ten changed: their keys then, less those live now, are read.
        let Gone::Deleted(deleted) = &scope.gone else {
            panic!("every live key read: {:?}", scope.gone)
        };
        let deleted: Vec<i64> = (0..1000).filter(|k| deleted.contains(*k)).collect();
        assert_eq!(deleted, [5, 6, 150]);
        // The rewritten file's 99 rows and the batch's two are recomputed.
        assert_eq!(scope.replaced_count, 101);
        // Their rows in the target go (the rewritten file's as replaced), with those deleted.
        let gone = gone_keys(&scope, (0..1000).chain([5000]));
        let expected: Vec<i64> = [5, 6]
            .into_iter()
            .chain(100..200)
            .chain([250, 5000])
            .collect();
        assert_eq!(gone, expected);
        // A target of the same ten files: only the three holding keys 0–299 are read.
        let target = Location::local(dir.path().join("target"));
        source(&target).await;
        let target_table = super::super::open(&target).await.unwrap().unwrap();
        let read = files_to_read(&target, &target_table, &scope)
            .unwrap()
            .unwrap();
        let first_keys = |read: &std::collections::HashSet<String>| {
            let snapshot = target_table.snapshot().unwrap();
            let root = files::root_url(&target_table);
            let mut first: Vec<i64> = snapshot
                .log_data()
                .into_iter()
                .filter(|view| {
                    let id = files::scan_id(&target, &root, &view.path()).unwrap();
                    read.contains(id.as_str())
                })
                .map(|view| {
                    let stats: serde_json::Value =
                        serde_json::from_str(&view.stats().unwrap()).unwrap();
                    stats["minValues"]["k"].as_i64().unwrap()
                })
                .collect();
            first.sort();
            first
        };
        assert_eq!(first_keys(&read), [0, 100, 200]);
        // The candidate of its checks reads the other seven whole.
        let split = scope.split_files(&target, &target_table).unwrap().unwrap();
        assert_eq!(first_keys(&split.cut.into_iter().collect()), [0, 100, 200]);
        assert_eq!(
            first_keys(&split.whole.into_iter().collect()),
            [300, 400, 500, 600, 700, 800, 900]
        );

        // The removed file vacuumed: every live key tells the same.
        std::fs::remove_file(dir.path().join("source").join(&removed)).unwrap();
        let scope = super::scope(&path, &now, after, "k", "k")
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(scope.gone, Gone::NotLive(_)), "{:?}", scope.gone);
        assert_eq!(gone_keys(&scope, (0..1000).chain([5000])), gone);
        // Any file may then hold a key not live.
        assert_eq!(files_to_read(&target, &target_table, &scope).unwrap(), None);
        assert_eq!(scope.split_files(&target, &target_table).unwrap(), None);

        // A batch marking a row in six files of ten: every live key is read rather than 600 rows
        // twice, and tells the same.
        let path = Location::local(dir.path().join("wide"));
        let after = source(&path).await;
        mark_deleted(&path, &[1, 101, 201, 301, 401, 501]).await;
        let now = super::super::open(&path).await.unwrap().unwrap();
        let scope = super::scope(&path, &now, after, "k", "k")
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(scope.gone, Gone::NotLive(_)), "{:?}", scope.gone);
        assert_eq!(gone_keys(&scope, 0..1000), [1, 101, 201, 301, 401, 501]);
        // One file of ten changed since: the rows it marked are the only ones gone.
        mark_deleted(&path, &[2, 3]).await;
        let later = super::super::open(&path).await.unwrap().unwrap();
        let version = now.version().unwrap();
        let scope = super::scope(&path, &later, version, "k", "k")
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(scope.gone, Gone::Deleted(_)), "{:?}", scope.gone);
        assert_eq!(gone_keys(&scope, 0..1000), [2, 3]);

        // That file restored to no vector (as a RESTORE does): its rows are recomputed, none gone.
        let snapshot = later.snapshot().unwrap();
        let view = snapshot
            .log_data()
            .into_iter()
            .find(|view| {
                view.path().ends_with(".parquet") && {
                    let stats: serde_json::Value =
                        serde_json::from_str(&view.stats().unwrap()).unwrap();
                    stats["minValues"]["k"] == 0
                }
            })
            .unwrap();
        #[allow(deprecated)]
        let mut add = view.add_action();
        assert!(add.deletion_vector.is_some());
        add.deletion_vector = None;
        let actions = vec![Action::Remove(view.remove_action(true)), Action::Add(add)];
        let restore = DeltaOperation::Delete { predicate: None };
        files::commit(&path, &later, actions, restore, Default::default())
            .await
            .unwrap();
        let restored = super::super::open(&path).await.unwrap().unwrap();
        let version = later.version().unwrap();
        let scope = super::scope(&path, &restored, version, "k", "k")
            .await
            .unwrap()
            .unwrap();
        let Gone::Deleted(deleted) = &scope.gone else {
            panic!("every live key read: {:?}", scope.gone)
        };
        assert!(!(0..1000).any(|k| deleted.contains(k)));
        assert_eq!(scope.replaced_count, 100);
        assert_eq!(gone_keys(&scope, 0..1000), (0..100).collect::<Vec<_>>());
    }

    fn vector(cardinality: i64, offset: i32) -> DeletionVectorDescriptor {
        DeletionVectorDescriptor {
            storage_type: deltalake::kernel::StorageType::UuidRelativePath,
            path_or_inline_dv: "ab^-aqEH.-t@S}K{vb[*k^".into(),
            offset: Some(offset),
            size_in_bytes: 10,
            cardinality,
        }
    }

    #[test]
    fn the_log_tells_a_file_whose_vector_lost_rows_and_leaves_a_changed_one_to_read() {
        use VectorChange::*;
        // No vector then, or the same one: its live rows were live before.
        assert_eq!(vector_change(None, None), Same);
        assert_eq!(vector_change(None, Some(&vector(3, 1))), Same);
        assert_eq!(
            vector_change(Some(&vector(3, 1)), Some(&vector(3, 1))),
            Same
        );
        // Gone, or fewer rows: rows are live that were not (a restore).
        assert_eq!(vector_change(Some(&vector(3, 1)), None), Restored);
        assert_eq!(
            vector_change(Some(&vector(5, 1)), Some(&vector(3, 9))),
            Restored
        );
        // Another one of as many rows or more: grown, or swapped by a restore.
        assert_eq!(
            vector_change(Some(&vector(3, 1)), Some(&vector(5, 9))),
            Changed
        );
        assert_eq!(
            vector_change(Some(&vector(3, 1)), Some(&vector(3, 9))),
            Changed
        );
    }

    /// Vectors written as medallion writes them, read back: one that grew still deletes every row
    /// the old one did; one of more rows that lost one does not.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_changed_vector_is_read_to_tell_a_grown_one_from_a_restore() {
        use delta_kernel::actions::deletion_vector_writer::{
            KernelDeletionVector, StreamingDeletionVectorWriter,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = Location::local(dir.path().join("t"));
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let options = super::super::TableOptions::default();
        let table = super::super::create_if_missing(&path, &schema, &options)
            .await
            .unwrap();
        let id = uuid::Uuid::new_v4();
        let mut bytes = Vec::new();
        let mut written = Vec::new();
        {
            let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
            for rows in [vec![1u64, 2], vec![1, 2, 3], vec![2, 3, 4]] {
                let mut vector = KernelDeletionVector::new();
                vector.add_deleted_row_indexes(rows);
                let w = writer.write_deletion_vector(vector).unwrap();
                written.push(DeletionVectorDescriptor {
                    storage_type: deltalake::kernel::StorageType::UuidRelativePath,
                    path_or_inline_dv: z85::encode(id.as_bytes()),
                    offset: Some(w.offset),
                    size_in_bytes: w.size_in_bytes,
                    cardinality: w.cardinality,
                });
            }
            writer.finalize().unwrap();
        }
        std::fs::write(
            dir.path().join(format!("t/deletion_vector_{id}.bin")),
            bytes,
        )
        .unwrap();
        let missing = DeletionVectorDescriptor {
            path_or_inline_dv: z85::encode(uuid::Uuid::new_v4().as_bytes()),
            ..written[0].clone()
        };
        let pairs = [(0, 1), (0, 2), (1, 2)]
            .into_iter()
            .map(|(old, new)| {
                let id = format!("{old}-{new}");
                (id, written[old].clone(), written[new].clone())
            })
            .chain([("gone".to_string(), missing, written[1].clone())])
            .collect();
        let storage = Arc::new(Counting {
            inner: table.log_store().engine(None).storage_handler(),
            requests: Default::default(),
        });
        let kept: HashMap<String, Result<bool, String>> =
            still_deleted(storage.clone(), files::root_url(&table), pairs)
                .await
                .into_iter()
                .collect();
        // Three pairs over one vector file, and one with a missing file: one request for the two.
        assert_eq!(
            *storage.requests.lock().unwrap(),
            vec![2],
            "files asked for, per request"
        );
        assert_eq!(kept["0-1"], Ok(true), "{{1, 2}} grown to {{1, 2, 3}}");
        assert_eq!(kept["0-2"], Ok(false), "{{1, 2}} swapped for {{2, 3, 4}}");
        assert_eq!(
            kept["1-2"],
            Ok(false),
            "{{1, 2, 3}} swapped for {{2, 3, 4}}"
        );
        assert!(kept["gone"].is_err(), "a vector file not found was read");
        assert!(
            still_deleted(storage.clone(), files::root_url(&table), Vec::new())
                .await
                .is_empty()
        );
        assert_eq!(
            storage.requests.lock().unwrap().len(),
            1,
            "nothing to read, read"
        );
    }

    /// A storage that counts the files asked for in each request, reading through `inner`.
    struct Counting {
        inner: Arc<dyn delta_kernel::StorageHandler>,
        requests: std::sync::Mutex<Vec<usize>>,
    }

    impl delta_kernel::StorageHandler for Counting {
        fn read_files(
            &self,
            files: Vec<delta_kernel::FileSlice>,
        ) -> delta_kernel::DeltaResult<
            Box<dyn Iterator<Item = delta_kernel::DeltaResult<bytes::Bytes>>>,
        > {
            self.requests.lock().unwrap().push(files.len());
            self.inner.read_files(files)
        }

        fn list_from(
            &self,
            path: &url::Url,
        ) -> delta_kernel::DeltaResult<
            Box<dyn Iterator<Item = delta_kernel::DeltaResult<delta_kernel::FileMeta>>>,
        > {
            self.inner.list_from(path)
        }

        fn copy_atomic(&self, src: &url::Url, dest: &url::Url) -> delta_kernel::DeltaResult<()> {
            self.inner.copy_atomic(src, dest)
        }

        fn put(
            &self,
            path: &url::Url,
            data: bytes::Bytes,
            overwrite: bool,
        ) -> delta_kernel::DeltaResult<()> {
            self.inner.put(path, data, overwrite)
        }

        fn head(&self, path: &url::Url) -> delta_kernel::DeltaResult<delta_kernel::FileMeta> {
            self.inner.head(path)
        }

        fn delete(&self, path: &url::Url) -> delta_kernel::DeltaResult<()> {
            self.inner.delete(path)
        }
    }
}
