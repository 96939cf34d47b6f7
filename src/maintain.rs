//! Table upkeep (`medallion maintain`, and automatically after a run): compaction of small files
//! (bin-packing, or Z-order by a stage's `zorder_by`), vacuum of unreferenced files with a retention that
//! can never undercut the pipeline's time-travel and backfill promises, and checkpoints.
//!
//! Vacuum deletes every file in a table's folder that no version within the retention reads and that is
//! older than it: the data files a compaction or an overwrite replaced, the deletion vectors a later one
//! superseded, and what an interrupted write left without a commit. The versions kept readable are each
//! one committed within the retention and the one current when it began. `maintain` holds the
//! pipeline's run lock while it changes anything, so it never deletes the files of this pipeline's run
//! before their commit; with a retention under a day, files no commit names are left alone. The log
//! goes by the same rule, and only here ([`delta::history`]). Vacuum also deletes the checks' partial
//! aggregates that no check used for a week ([`checks::sweep_folder`]).

use std::{num::NonZeroU64, time::Duration};

use crate::storage::Location;

use deltalake::{
    DeltaTable,
    logstore::commit_uri_from_version,
    operations::{optimize::OptimizeType, vacuum::VacuumMode},
};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tracing::warn;

use crate::{
    checks,
    config::{Pipeline, Stage, TableName},
    delta::{self, DeltaError},
    lake,
};

#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    #[error(
        "refusing to vacuum with a retention of {asked} day(s): the pipeline promises time travel for \
         {time_travel} day(s) and backfills over {backfill} day(s) (`maintenance:` in the pipeline file), \
         and vacuum would delete the files those read. Use a retention of at least {minimum} day(s)"
    )]
    RetentionTooShort {
        asked: u32,
        time_travel: u32,
        backfill: u32,
        minimum: u32,
    },
    #[error("table `{table}`: {source}")]
    Delta {
        table: String,
        source: deltalake::DeltaTableError,
    },
    #[error(transparent)]
    Open(#[from] DeltaError),
    #[error(transparent)]
    Lock(#[from] crate::runner::lock::LockError),
    #[error(transparent)]
    Lake(Box<lake::LakeError>),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl From<lake::LakeError> for MaintainError {
    fn from(error: lake::LakeError) -> Self {
        MaintainError::Lake(Box::new(error))
    }
}

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct MaintainOptions {
    pub optimize: bool,
    pub vacuum: bool,
    pub checkpoint: bool,
    pub dry_run: bool,
    /// Overrides `maintenance.vacuum_retention_days`; refused below the promised windows.
    pub retention_days: Option<u32>,
    /// How long to wait for a run of the pipeline to end before giving up.
    pub lock_timeout: Duration,
}

/// What was done (or, in a dry run, would be done) to one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableUpkeep {
    pub table: String,
    pub files_before: u64,
    pub small_files: u64,
    pub files_compacted: u64,
    pub files_written: u64,
    pub files_vacuumed: u64,
    /// Entries of the log (commits, checkpoints, checksums) that no kept version needs.
    pub log_entries_removed: u64,
    pub checkpoint_version: Option<u64>,
}

/// The pipeline's tables, each with the stage that writes it: stage targets, their quarantine tables,
/// and medallion's own state tables.
async fn pipeline_tables(
    pipeline: &Pipeline,
) -> Result<Vec<(TableName, Option<&Stage>)>, MaintainError> {
    let mut tables: Vec<(TableName, Option<&Stage>)> = pipeline
        .stages
        .iter()
        .map(|s| (s.target.clone(), Some(s)))
        .collect();
    for stage in &pipeline.stages {
        tables.push((checks::quarantine_table(&stage.target), None));
    }
    for table in lake::tables(&pipeline.lake).await? {
        if table.schema == "_medallion" {
            tables.push((table, None));
        }
    }
    tables.sort_by(|a, b| a.0.cmp(&b.0));
    tables.dedup_by(|a, b| a.0 == b.0);
    Ok(tables)
}

pub async fn maintain(
    pipeline: &Pipeline,
    options: &MaintainOptions,
) -> Result<Vec<TableUpkeep>, MaintainError> {
    let settings = &pipeline.maintenance;
    let retention = options
        .retention_days
        .unwrap_or(settings.vacuum_retention_days);
    if options.vacuum && retention < settings.minimum_retention_days() {
        return Err(MaintainError::RetentionTooShort {
            asked: retention,
            time_travel: settings.time_travel_days,
            backfill: settings.backfill_days,
            minimum: settings.minimum_retention_days(),
        });
    }
    let lock = if options.dry_run {
        None
    } else {
        // Compaction and vacuum commit like a run does: the same storage checks first, and no run
        // meanwhile (vacuum would take its uncommitted files for leftovers).
        crate::storage::preflight(&pipeline.lake).await?;
        Some(
            crate::runner::lock::acquire(&pipeline.lake, &pipeline.name, options.lock_timeout)
                .await?,
        )
    };
    let done = upkeep_all(pipeline, retention, options).await;
    if let Some(lock) = lock {
        // Released on failure too: on object storage a lock dropped unreleased may outlive the run.
        lock.release().await;
    }
    done
}

/// [`upkeep`] of each of the pipeline's tables that exists.
async fn upkeep_all(
    pipeline: &Pipeline,
    retention: u32,
    options: &MaintainOptions,
) -> Result<Vec<TableUpkeep>, MaintainError> {
    let mut done = Vec::new();
    for (table, stage) in pipeline_tables(pipeline).await? {
        let path = pipeline.table_path(&table);
        if delta::open(&path).await?.is_none() {
            continue;
        }
        let terms = Terms::of(pipeline, stage, retention);
        done.push(upkeep(&table, path, &terms, options).await?);
    }
    if options.vacuum {
        // A cache: what cannot be swept now is left for the next time, and the tables' upkeep stands.
        match checks::sweep_folder(&checks::partials_folder(&pipeline.lake), options.dry_run).await
        {
            Ok(swept) if swept.files > 0 => done.push(TableUpkeep {
                table: PARTIALS_ROW.to_string(),
                files_before: swept.files,
                files_vacuumed: swept.unused - swept.failed,
                ..TableUpkeep::default()
            }),
            Ok(_) => {}
            Err(error) => warn!("the checks' partial aggregates were not swept: {error}"),
        }
    }
    Ok(done)
}

/// The row of [`render`] for the checks' partial aggregates (not a table): their files, and those
/// vacuumed, no check having used them for a week. They are shared by the pipelines of the lake, and
/// swept by the same rule by the runs of each.
const PARTIALS_ROW: &str = "_medallion/partials";

/// Compacts `table` when more than `threshold` of its files are ones compaction could join (no larger
/// than the size it joins them into); used after runs.
pub async fn optimize_if_needed(
    pipeline: &Pipeline,
    table: &TableName,
    threshold: u64,
) -> Result<Option<TableUpkeep>, MaintainError> {
    if threshold == 0 {
        return Ok(None);
    }
    let path = pipeline.table_path(table);
    let Some(delta) = delta::open(&path).await? else {
        return Ok(None);
    };
    let stage = pipeline.stages.iter().find(|s| &s.target == table);
    let terms = Terms::of(pipeline, stage, 0);
    // Counted: the files compaction could join (those over its size are left as they are).
    let (_, joinable) = file_sizes(&table.to_string(), &delta, terms.compacted_bytes + 1).await?;
    if joinable <= threshold {
        return Ok(None);
    }
    let options = MaintainOptions {
        optimize: true,
        ..MaintainOptions::default()
    };
    upkeep(table, path, &terms, &options).await.map(Some)
}

/// (files, files smaller than `small`)
async fn file_sizes(
    name: &str,
    table: &deltalake::DeltaTable,
    small: u64,
) -> Result<(u64, u64), MaintainError> {
    let mut files = 0;
    let mut small_files = 0;
    let mut stream = table.get_active_add_actions_by_partitions(&[]);
    while let Some(file) = stream.next().await {
        let file = file.map_err(|source| MaintainError::Delta {
            table: name.to_string(),
            source,
        })?;
        files += 1;
        if (file.size().max(0) as u64) < small {
            small_files += 1;
        }
    }
    Ok((files, small_files))
}

/// What the upkeep of one table keeps to.
#[derive(Clone, Copy)]
struct Terms<'a> {
    /// The columns its compaction clusters rows by (none: files are only joined).
    zorder: &'a [String],
    /// Days the vacuum keeps replaced files for.
    retention_days: u32,
    /// The history the pipeline promises, which the table's properties must keep for every Delta tool.
    history_days: u32,
    /// The size compaction joins files into; larger files are left as they are.
    compacted_bytes: u64,
}

impl<'a> Terms<'a> {
    /// The terms of a table `stage` writes (`None`: a quarantine or state table).
    ///
    /// A stage incremental by a column rebuilds ranges of its values, and writes a range computed
    /// on its own into files of its own once they hold about [`delta::MIN_EARLY_FINISH_BYTES`]
    /// (BENCHMARKS.md, item 69). Its table is compacted into files of no more than half that, so
    /// that those files are never joined: joined into files of the target size, ranges would share
    /// files again, and each rebuild of recent dates would rewrite a file holding years. A
    /// partitioned table's writers do not cut at ranges (each file holds its partition's values as
    /// they come), and a Z-order rewrites every file anyway: both keep the target size.
    fn of(pipeline: &Pipeline, stage: Option<&'a Stage>, retention_days: u32) -> Self {
        let target = pipeline.maintenance.target_file_bytes;
        let zorder = stage.map_or(&[][..], |s| s.zorder_by.as_slice());
        let rebuilt_by_ranges = stage.is_some_and(|s| {
            s.incremental.as_ref().and_then(|i| i.column()).is_some()
                && s.partition_by.is_empty()
                && s.zorder_by.is_empty()
        });
        Terms {
            zorder,
            retention_days,
            history_days: pipeline.maintenance.vacuum_retention_days,
            compacted_bytes: if rebuilt_by_ranges {
                target.min(delta::MIN_EARLY_FINISH_BYTES as u64 / 2)
            } else {
                target
            },
        }
    }
}

/// Upkeep of one table, kept to `terms`.
async fn upkeep(
    table: &TableName,
    path: Location,
    terms: &Terms<'_>,
    options: &MaintainOptions,
) -> Result<TableUpkeep, MaintainError> {
    let Terms {
        zorder,
        retention_days,
        history_days,
        compacted_bytes,
    } = *terms;
    let name = table.to_string();
    let fail = |source| MaintainError::Delta {
        table: name.clone(),
        source,
    };
    let mut delta = delta::open(&path).await?.ok_or_else(|| {
        MaintainError::Open(DeltaError::Invalid {
            table: name.clone(),
            message: "not a Delta table".into(),
        })
    })?;
    let (files_before, small_files) = file_sizes(&name, &delta, compacted_bytes / 4).await?;
    let mut upkeep = TableUpkeep {
        table: name.clone(),
        files_before,
        small_files,
        ..TableUpkeep::default()
    };
    // First, so that the compaction's and the vacuum's own commits, which take no commit properties
    // from their builders, do not clean the log by delta-rs's rule either.
    if !options.dry_run
        && let Some(kept) = delta::history::keep(&path, &delta, history_days).await?
    {
        delta = kept;
    }
    if options.optimize && !options.dry_run && (small_files > 1 || !zorder.is_empty()) {
        let kind = if zorder.is_empty() {
            OptimizeType::Compact
        } else {
            OptimizeType::ZOrder(zorder.to_vec())
        };
        let size = NonZeroU64::new(compacted_bytes).unwrap_or(NonZeroU64::MIN);
        let properties = delta::table_writer_properties(&delta);
        let (optimized, metrics) = delta
            .optimize()
            .with_type(kind)
            .with_target_size(size)
            .with_writer_properties(properties)
            .await
            .map_err(fail)?;
        upkeep.files_compacted = metrics.num_files_removed;
        upkeep.files_written = metrics.num_files_added;
        delta = optimized;
    }
    if options.vacuum {
        // A retention longer than any date can say keeps everything.
        let start = chrono::Utc::now()
            .checked_sub_signed(chrono::Duration::days(i64::from(retention_days)))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let readable = versions_to_keep(&delta, start).await.map_err(fail)?;
        // Full: what no kept version reads goes, whether a commit removed it or none ever added it.
        // A file no commit names may belong to a write in progress (of another pipeline sharing
        // the `_medallion` tables): with a retention under a day, only removed files go.
        let mode = if retention_days >= 1 {
            VacuumMode::Full
        } else {
            VacuumMode::Lite
        };
        let (vacuumed, metrics) = delta
            .vacuum()
            .with_mode(mode)
            .with_keep_versions(&readable)
            .with_retention_period(chrono::Duration::days(i64::from(retention_days)))
            .with_enforce_retention_duration(false)
            .with_dry_run(options.dry_run)
            .await
            .map_err(fail)?;
        upkeep.files_vacuumed = metrics.files_deleted.len() as u64;
        delta = vacuumed;
        // The log goes by the same rule: every version from the one current at `start` on stays.
        let expired = delta::history::expired_log_entries(&path, &delta, start).await?;
        upkeep.log_entries_removed = expired.len() as u64;
        if !options.dry_run {
            delta::history::delete_log_entries(&path, &delta, expired).await?;
        }
    }
    if options.checkpoint && !options.dry_run {
        deltalake::checkpoints::create_checkpoint(&delta, None)
            .await
            .map_err(fail)?;
        upkeep.checkpoint_version = delta.version();
    }
    Ok(upkeep)
}

/// The versions whose files vacuum keeps so that every version of `table` a reader may still ask
/// for, since `start`, stays readable (by its log entry's time, as `--as-of` finds versions): the one
/// current then (or the oldest still in the log), and each committed since that added a file with a
/// deletion vector or a file older than the window. Every other file such a version reads is the
/// current version's, or was written within the window (too young to go); a remove action does not
/// protect a file for long (a checkpoint drops removes after `delta.deletedFileRetentionDuration`,
/// and an old remove of a file a restore added again counts as expired), and none names a vector.
async fn versions_to_keep(
    table: &DeltaTable,
    start: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<u64>, deltalake::DeltaTableError> {
    let Some(current) = table.version() else {
        return Ok(Vec::new());
    };
    let start_millis = start.timestamp_millis();
    let store = table.object_store();
    // Newest first, a few log entries at a time (one request each on object storage).
    let mut entries = futures::stream::iter((0..=current).rev())
        .map(|version| {
            let store = store.clone();
            async move {
                let entry = match store.get(&commit_uri_from_version(Some(version))).await {
                    Ok(got) => {
                        let when = got.meta.last_modified;
                        got.bytes().await.map(|bytes| Some((when, bytes)))
                    }
                    Err(deltalake::ObjectStoreError::NotFound { .. }) => Ok(None),
                    Err(error) => Err(error),
                };
                (version, entry)
            }
        })
        .buffered(16);
    let mut keep = Vec::new();
    let mut oldest = None;
    while let Some((version, entry)) = entries.next().await {
        let Some((when, commit)) = entry? else {
            break;
        };
        if when < start {
            oldest = Some(version);
            break;
        }
        if adds_vector_or_old_file(&commit, start_millis) {
            keep.push(version);
        }
        oldest = Some(version);
    }
    match oldest {
        Some(oldest) if !keep.contains(&oldest) => keep.push(oldest),
        Some(_) => {}
        None => {
            return Err(deltalake::DeltaTableError::Generic(format!(
                "the log entry of version {current} is gone"
            )));
        }
    }
    Ok(keep)
}

/// Whether the log entry `commit` adds a file with a deletion vector, or one written before
/// `start_millis` (a restore adds old files again, with their first `modificationTime`). A line
/// that cannot be read counts as one: keeping a version is the safe answer.
fn adds_vector_or_old_file(commit: &[u8], start_millis: i64) -> bool {
    commit
        .split(|b| *b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .any(|line| {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                return true;
            };
            action.get("add").is_some_and(|add| {
                add.get("deletionVector")
                    .is_some_and(serde_json::Value::is_object)
                    || add
                        .get("modificationTime")
                        .and_then(serde_json::Value::as_i64)
                        .is_none_or(|written| written < start_millis)
            })
        })
}

pub fn render(done: &[TableUpkeep], dry_run: bool) -> String {
    let mut out = format!(
        "{:<32} {:>7} {:>7} {:>10} {:>8} {:>9} {:>10} {:>5}{}\n",
        "table",
        "files",
        "small",
        "compacted",
        "written",
        "vacuumed",
        "checkpoint",
        "log",
        if dry_run {
            "   (dry run: nothing changed)"
        } else {
            ""
        }
    );
    for t in done {
        out.push_str(&format!(
            "{:<32} {:>7} {:>7} {:>10} {:>8} {:>9} {:>10} {:>5}\n",
            t.table,
            t.files_before,
            t.small_files,
            t.files_compacted,
            t.files_written,
            t.files_vacuumed,
            t.checkpoint_version.map_or("-".into(), |v| v.to_string()),
            t.log_entries_removed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use datafusion::arrow::{
        array::{Date32Array, Int64Array, RecordBatch},
        datatypes::{DataType, Field, Schema},
    };
    use futures::StreamExt;

    use super::{MaintainOptions, Terms, adds_vector_or_old_file, upkeep};
    use crate::{
        config::{self, TableName},
        delta::{self, CommitMeta, TableOptions},
        storage::Location,
    };

    #[test]
    fn a_table_rebuilt_by_ranges_of_a_column_is_compacted_into_files_no_larger_than_a_range_gets() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/transactions.yaml");
        let pipeline = config::load_with_env(&path, |_| None, &BTreeMap::new()).unwrap();
        let target = pipeline.maintenance.target_file_bytes;
        assert!(target > delta::MIN_EARLY_FINISH_BYTES as u64);
        let terms = |table: &str| {
            let table = TableName::parse(table).unwrap();
            let stage = pipeline.stages.iter().find(|s| s.target == table);
            let terms = Terms::of(&pipeline, stage, 7);
            (terms.compacted_bytes, terms.zorder.to_vec())
        };
        // Incremental by txn_date, unpartitioned: its ranges are kept apart.
        for table in ["gold.merchant_daily", "gold.daily_kpis"] {
            assert_eq!(
                terms(table),
                (delta::MIN_EARLY_FINISH_BYTES as u64 / 2, Vec::new()),
                "{table}"
            );
        }
        // Partitioned by year; Z-ordered (Silver); a dimension rebuilt whole; a quarantine table.
        assert_eq!(terms("gold.fact_transactions"), (target, Vec::new()));
        assert_eq!(
            terms("silver.transactions"),
            (target, vec!["dms_id".to_string()])
        );
        assert_eq!(terms("gold.dim_card"), (target, Vec::new()));
        let silver = TableName::parse("silver.transactions").unwrap();
        let quarantine = crate::checks::quarantine_table(&silver).to_string();
        assert_eq!(terms(&quarantine), (target, Vec::new()));
    }

    /// One commit of `rows` rows spread over the days `days` (from 1970), with values that do not
    /// compress: a file of about eight bytes a row.
    async fn append_days(path: &Location, days: std::ops::Range<i32>, rows: usize) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Date32, false),
            Field::new("value", DataType::Int64, false),
        ]));
        let span = days.len();
        let day =
            Date32Array::from_iter_values((0..rows).map(|i| days.start + (i * span / rows) as i32));
        let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ days.start as u64;
        let value = Int64Array::from_iter_values((0..rows).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as i64
        }));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(day), Arc::new(value)]).unwrap();
        delta::append_batches(
            path,
            vec![batch],
            &TableOptions::default(),
            &CommitMeta::default(),
        )
        .await
        .unwrap();
    }

    /// The table's files: path → (rows, least day, greatest day), by their statistics.
    async fn files(path: &Location) -> BTreeMap<String, (usize, String, String)> {
        let table = delta::open(path).await.unwrap().unwrap();
        let mut files = BTreeMap::new();
        let mut stream = table.get_active_add_actions_by_partitions(&[]);
        while let Some(file) = stream.next().await {
            let file = file.unwrap();
            let stats: serde_json::Value = serde_json::from_str(&file.stats().unwrap()).unwrap();
            let day = |bound: &str| stats[bound]["day"].as_str().unwrap().to_string();
            let rows = file.num_records().unwrap();
            files.insert(
                file.path().to_string(),
                (rows, day("minValues"), day("maxValues")),
            );
        }
        files
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_joins_only_files_under_its_size_and_leaves_larger_ones_as_they_are() {
        let options = MaintainOptions {
            optimize: true,
            ..MaintainOptions::default()
        };
        let table = TableName::parse("gold.t").unwrap();
        let mut after = Vec::new();
        for compacted_bytes in [100_000, 10_000_000] {
            let dir = tempfile::tempdir().unwrap();
            let path = Location::from(dir.path());
            // Three ranges of ten days in files of about 160 KB, as a build in slices writes them,
            // then the small files of daily runs over later days, in between.
            append_days(&path, 0..10, 20_000).await;
            append_days(&path, 100..101, 10).await;
            append_days(&path, 10..20, 20_000).await;
            append_days(&path, 101..102, 10).await;
            append_days(&path, 102..103, 10).await;
            append_days(&path, 20..30, 20_000).await;
            append_days(&path, 103..104, 10).await;
            append_days(&path, 104..105, 10).await;
            let before = files(&path).await;
            let large: BTreeMap<_, _> = before
                .iter()
                .filter(|(_, (rows, _, _))| *rows == 20_000)
                .collect();
            assert_eq!(large.len(), 3);
            let terms = Terms {
                zorder: &[],
                retention_days: 7,
                history_days: 7,
                compacted_bytes,
            };
            let done = upkeep(&table, path.clone(), &terms, &options)
                .await
                .unwrap();
            let files = files(&path).await;
            let rows: usize = files.values().map(|(rows, _, _)| rows).sum();
            assert_eq!(rows, 60_050, "compaction keeps every row");
            let kept = large
                .keys()
                .filter(|file| files.contains_key(file.as_str()))
                .count();
            after.push((done.files_compacted, done.files_written, files.len(), kept));
        }
        // Under 100 KB: the runs' files next to each other in the log are joined (the two pairs;
        // the first run's file has a range's file on each side), the ranges' files kept.
        assert_eq!(after[0], (4, 2, 6, 3));
        // Under 10 MB: everything in one file, which each rebuild of the runs' days would rewrite.
        assert_eq!(after[1], (8, 1, 1, 0));
    }

    #[test]
    fn a_commit_adding_a_file_with_a_vector_or_an_old_file_is_told_from_others() {
        let vector = r#"{"storageType":"u","pathOrInlineDv":"ab","offset":1,"sizeInBytes":9,"cardinality":2}"#;
        let start = 1_000;
        let keeps = |commit: String| adds_vector_or_old_file(commit.as_bytes(), start);
        // A file added again with a vector.
        assert!(keeps(format!(
            "{{\"commitInfo\":{{\"operation\":\"MERGE\"}}}}\n\
             {{\"remove\":{{\"path\":\"a.parquet\",\"deletionTimestamp\":2000}}}}\n\
             {{\"add\":{{\"path\":\"a.parquet\",\"modificationTime\":2000,\"deletionVector\":{vector}}}}}\n"
        )));
        // A file written before the window, added again (a restore).
        assert!(keeps(
            "{\"add\":{\"path\":\"b.parquet\",\"modificationTime\":999}}\n".into()
        ));
        // A line that cannot be read: kept, to be safe.
        assert!(keeps("{\"add\":{\"path\n".into()));
        // New files without vectors, a null vector, a vector only on the file removed: not kept.
        assert!(!keeps(format!(
            "{{\"add\":{{\"path\":\"b.parquet\",\"modificationTime\":1000}}}}\n\
             {{\"add\":{{\"path\":\"c.parquet\",\"modificationTime\":3000,\"deletionVector\":null}}}}\n\
             {{\"remove\":{{\"path\":\"a.parquet\",\"deletionVector\":{vector}}}}}\n\r\n"
        )));
    }
}
