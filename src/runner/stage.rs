//! One stage, start to finish: an ingest stage lands new files in Bronze; a SQL stage reads its inputs
//! (only their new rows when it is incremental), checks expectations, and writes its target in its write
//! mode. Either way the target gets at most one commit, and the stage's run is recorded with the input
//! versions it consumed, which are the watermarks of its next run.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Instant,
};

use datafusion::arrow::record_batch::RecordBatch;
use futures::{StreamExt, TryStreamExt};

use tracing::{Instrument, debug, info, info_span, warn};

use super::{RunContext, RunError, StageOutcome, StageReport, progress::StageProgress};
use crate::checks::CheckResult;
use crate::{
    checks,
    config::{BadFilePolicy, ExpectationAction, Incremental, Stage, StageInput, WriteMode},
    delta::{self, BatchAppender, CdcSpec, CommitMeta, TableOptions, WriteMetrics},
    engine::{self, scratch::Scratch},
    landing::{self, BATCH_ID, BronzeLayout, FileBatches, LandingFile, Lineage},
    state::{self, LedgerEntry, StageRecord},
    storage::{self, Location},
};

/// How often an ingest lands its files again when other writers keep committing to its Bronze table first.
const MAX_INGEST_ATTEMPTS: u32 = 10;

/// Rows per Bronze batch while streaming landing files.
const INGEST_BATCH_ROWS: usize = 16 * 1024;

/// The name a SQL stage's materialized output is registered under.
const STAGE_OUTPUT: &str = "__medallion_stage_output";
/// The copy a first load written as it is computed keeps in scratch ([`write_first_load`]).
const FIRST_LOAD_COPY: &str = "__medallion_first_load_copy";

/// Runs stage `index`; never fails: errors become a failed [`StageReport`].
pub(super) async fn run(context: &RunContext, index: usize) -> StageReport {
    let stage = &context.pipeline.stages[index];
    let span =
        info_span!("stage", stage = %stage.name, layer = %stage.layer, target = %stage.target);
    async {
        let clock = Instant::now();
        let started = state::now_micros();
        info!("stage started");
        let progress = context.progress.stage(&stage.name);
        let result = match &stage.input {
            StageInput::Ingest { source } => ingest(context, stage, source, &progress).await,
            StageInput::Sql { text, reads, .. } => {
                sql_stage(context, stage, text, reads, &progress).await
            }
        };
        let (mut report, input_versions) = match result {
            Ok(done) => done,
            Err(error) => {
                let mut message = error.to_string();
                if let Some(limit) = context.options.memory_limit
                    && message.contains("Resources exhausted")
                {
                    message = format!(
                        "{message}\nthe stage needs more than the {} MiB of `--memory-limit`; raise it \
                         (nothing was written)",
                        limit >> 20
                    );
                }
                (
                    StageReport::new(stage, StageOutcome::Failed(message)),
                    BTreeMap::new(),
                )
            }
        };
        report.warnings.extend(creation_drift(context, stage).await);
        report.elapsed = clock.elapsed();
        drop(progress);
        if !matches!(report.outcome, StageOutcome::UpToDate(_)) {
            let record = StageRecord {
                run_id: context.run_id.clone(),
                pipeline: context.pipeline.name.clone(),
                stage: stage.name.clone(),
                target: stage.target.to_string(),
                status: report.status().to_string(),
                started_micros: started,
                finished_micros: state::now_micros(),
                rows_read: report.rows_read,
                rows_written: report.rows_written,
                rows_inserted: report.rows_inserted,
                rows_updated: report.rows_updated,
                rows_deleted: report.rows_deleted,
                rows_superseded: report.rows_superseded,
                input_versions,
                output_version: report.output_version,
                message: match &report.outcome {
                    StageOutcome::Failed(m) => Some(m.clone()),
                    _ => None,
                },
            };
            let meta = commit_meta(context, stage);
            crate::crash::point("before_stage_history");
            if let Err(error) = context
                .state
                .record_checks(&context.run_id, &stage.name, &report.checks, &meta)
                .await
            {
                warn!("could not record the stage's checks: {error}");
            }
            if let Err(error) = context.state.record_stages(&[record], &meta).await {
                // The data commit stands; without its watermark the next run re-applies the same
                // input, which every write mode tolerates (see README, "Idempotency").
                warn!("could not record the stage run: {error}");
                report
                    .warnings
                    .push(format!("run history not recorded: {error}"));
            }
        }
        info!(
            status = report.status(),
            rows_read = report.rows_read,
            rows_written = report.rows_written,
            "stage finished"
        );
        report
    }
    .instrument(span)
    .await
}

/// Notes for the settings a table takes when it is created (`stats_columns`, `compression`,
/// `deletion_vectors`) that the stage names otherwise than its existing target keeps: a table is not
/// re-created for them.
async fn creation_drift(context: &RunContext, stage: &Stage) -> Vec<String> {
    if stage.stats_columns.is_none() && stage.compression.is_none() && !stage.deletion_vectors {
        return Vec::new();
    }
    let path = context.pipeline.table_path(&stage.target);
    let Ok(Some(table)) = delta::open(&path).await else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    if let Some(wanted) = &stage.stats_columns {
        let kept = delta::stats_columns(&table);
        if kept.as_ref() != Some(wanted) {
            notes.push(format!(
                "`stats_columns` differs from the statistics columns of the existing table ({}); it \
                 applies when a table is created: set `delta.dataSkippingStatsColumns` with a Delta \
                 tool, or rebuild",
                kept.map_or_else(|| "every column".to_string(), |c| c.join(", "))
            ));
        }
    }
    if let Some(wanted) = stage.compression {
        let kept = delta::compression(&table);
        if kept != wanted {
            notes.push(format!(
                "`compression` is {wanted}, the existing table's files are written with {kept}; it \
                 applies when a table is created: set `{}` with a Delta tool, or rebuild",
                delta::COMPRESSION_PROPERTY
            ));
        }
    }
    if stage.deletion_vectors && !delta::deletion_vectors_enabled(&table) {
        notes.push(
            "`deletion_vectors` is set, the existing table was created without them and its files \
             are rewritten by each batch; it applies when a table is created: set \
             `delta.enableDeletionVectors` with a Delta tool, or rebuild"
                .to_string(),
        );
    }
    notes
}

fn commit_meta(context: &RunContext, stage: &Stage) -> CommitMeta {
    CommitMeta {
        run_id: context.run_id.clone(),
        stage: stage.name.clone(),
    }
}

fn table_options(context: &RunContext, stage: &Stage) -> TableOptions {
    TableOptions {
        partition_by: stage.partition_by.clone(),
        description: stage.description.clone(),
        not_null: Vec::new(),
        comments: stage.column_comments.clone(),
        target_file_size: Some(context.pipeline.maintenance.target_file_bytes),
        stats_columns: stage.stats_columns.clone(),
        compression: stage.compression,
        deletion_vectors: stage.deletion_vectors,
        history_days: Some(context.pipeline.maintenance.vacuum_retention_days),
    }
}

type StageResult = Result<(StageReport, BTreeMap<String, u64>), RunError>;

/// The codec of a Bronze table whose stage names none: snappy. Against zstd level 1, landing the 10M
/// benchmark rows takes 0.2 s less (5% of the CPU) and Silver's read of them 0.1 s less, in files half
/// as large again (BENCHMARKS.md, item 54).
const BRONZE_CODEC: delta::Codec = delta::Codec::SNAPPY;

/// Lands the source's new files in the Bronze target in one commit, then records them in the ledger.
async fn ingest(
    context: &RunContext,
    stage: &Stage,
    source_name: &str,
    progress: &StageProgress,
) -> StageResult {
    let name = stage.name.clone();
    let landing_err = |source| RunError::Landing {
        stage: name.clone(),
        source,
    };
    let source = context
        .pipeline
        .source(source_name)
        .ok_or_else(|| RunError::Internal {
            stage: name.clone(),
            message: format!("unknown source `{source_name}`"),
        })?
        .clone();
    let listed_at = state::now_micros();
    let mut files = landing::discover(&source).await.map_err(landing_err)?;
    let prefix_empty = files.is_empty();
    if let Some(date) = context.options.logical_date {
        // A logical date ingests what DMS had delivered by then; undated (full-load) files count as early.
        files.retain(|f| f.date().is_none_or(|d| d <= date));
    }
    let path = context.pipeline.table_path(&stage.target);
    let mut ledger = context.state.ingested_files(source_name).await?;
    // Object storage has no folders: a prefix that never held a file is most likely a wrong `path:`.
    // (Once files were landed, an empty prefix is fine: lifecycle rules expire old DMS files.)
    if prefix_empty && ledger.is_empty() && source.path.is_remote() {
        return Err(landing_err(landing::LandingError::MissingFolder {
            source_name: source_name.to_string(),
            path: source.path.clone(),
        }));
    }
    repair_ledger(context, stage, source_name, &path, &mut ledger).await?;
    // Content already landed under another name is a re-delivery: DMS or a copy job sent it again.
    let mut known_content: BTreeMap<String, String> = ledger
        .values()
        .map(|entry| (entry.checksum.clone(), entry.file.clone()))
        .collect();
    // Files set aside by an earlier run stay aside until their content changes (a fixed delivery).
    let known_bad = context.state.bad_files(source_name).await?;
    let mut redelivered = Vec::new();
    let mut new_files: Vec<(LandingFile, String, i64)> = Vec::new();
    // The checksums of files new or changed since the ledger saw them, computed side by side.
    let unchanged = |file: &LandingFile| {
        ledger.get(&file.relative).is_some_and(|known| {
            known.size == file.size && known.modified_micros == file.modified_micros
        })
    };
    // A file is hashed with SHA-256 too where it may be content an older ledger recorded by its SHA-256
    // (landing::Checksum): of one of its sizes, or set aside under its name.
    let legacy_sizes: HashSet<u64> = ledger
        .values()
        .filter(|entry| landing::is_legacy(&entry.checksum))
        .map(|entry| entry.size)
        .collect();
    let mut bad_by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, checksum) in &known_bad {
        bad_by_name.entry(name).or_default().push(checksum);
    }
    let legacy = |file: &LandingFile| {
        legacy_sizes.contains(&file.size)
            || bad_by_name
                .get(file.relative.as_str())
                .is_some_and(|recorded| recorded.iter().any(|c| landing::is_legacy(c)))
    };
    let hashing: Vec<_> = files
        .iter()
        .map(|file| checksum_unless(file, unchanged(file), legacy(file)))
        .collect();
    let checksums: Vec<Option<landing::Checksum>> = futures::stream::iter(hashing)
        .buffered(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .try_collect()
        .await
        .map_err(landing_err)?;
    // Known files found with their content under a new modification time (a copy job touched them).
    // Only a time older than the listing by more than a clock tick is recorded: a file written again
    // within the tick it was listed in may hold other bytes under the same time, which the next run,
    // finding its time unchanged, would not read (S3 gives whole seconds).
    let settled = listed_at - RACY_MICROS;
    let mut touched: Vec<(String, i64)> = Vec::new();
    for (file, checksum) in files.into_iter().zip(checksums) {
        let modified = file.modified_micros;
        let Some(checksum) = checksum else {
            continue; // landed before, unchanged since
        };
        match ledger.get(&file.relative) {
            Some(known) => {
                if known.size == file.size && checksum.matches(&known.checksum) {
                    if modified < settled {
                        touched.push((file.relative.clone(), modified));
                    }
                } else {
                    let sizes = format!("size {} → {}", known.size, file.size);
                    return Err(RunError::ChangedFile {
                        source_name: source_name.to_string(),
                        file: file.relative.clone(),
                        detail: match checksum.change_from(&known.checksum) {
                            Some(change) => format!("{sizes}, {change}"),
                            None => sizes,
                        },
                    });
                }
            }
            None => {
                let set_aside = bad_by_name
                    .get(file.relative.as_str())
                    .is_some_and(|recorded| recorded.iter().any(|c| checksum.matches(c)));
                if set_aside {
                    continue;
                }
                if let Some(original) = checksum.values().find_map(|v| known_content.get(v)) {
                    warn!(
                        file = %file.relative,
                        original = %original,
                        "skipped: same content as a file already landed"
                    );
                    redelivered.push(format!("`{}` (same as `{original}`)", file.relative));
                    continue;
                }
                let recorded = checksum.recorded().to_string();
                known_content.insert(recorded.clone(), file.relative.clone());
                new_files.push((file, recorded, modified));
            }
        }
    }
    // Recorded so that the next run knows them unchanged without reading them; if that fails, the next
    // run reads them again, and nothing else changes.
    if let Err(error) = context
        .state
        .record_touched(source_name, &touched, &commit_meta(context, stage))
        .await
    {
        let error = error.to_string();
        warn!(
            source = source_name,
            files = touched.len(),
            "could not record the new modification times of touched landing files (they are read again next run): {}",
            error.get(..500).unwrap_or(&error)
        );
    }
    let redelivered_note = (!redelivered.is_empty()).then(|| {
        format!(
            "{} re-delivered file(s) skipped: {}",
            redelivered.len(),
            redelivered.join(", ")
        )
    });
    if new_files.is_empty() {
        let reason = redelivered_note.unwrap_or_else(|| "no new landing files".into());
        return Ok((
            StageReport::new(stage, StageOutcome::UpToDate(reason)),
            BTreeMap::new(),
        ));
    }

    let layout = BronzeLayout::new(&source);
    let meta = commit_meta(context, stage);
    let delta_err = |source| RunError::Delta {
        stage: name.clone(),
        source,
    };
    // A file that cannot be read stops the ingest before anything is committed; unless the source
    // says `on_bad_file: fail`, the file is set aside and the ingest starts again without it.
    let mut bad_files: Vec<(LandingFile, String, String)> = Vec::new();
    let landing = loop {
        if new_files.is_empty() {
            break None;
        }
        match land_files(context, stage, &path, &layout, &meta, &new_files, progress).await {
            Ok(done) => break Some(done),
            Err(LandFailure::Landing(error)) if source.on_bad_file != BadFilePolicy::Fail => {
                let Some(index) = new_files.iter().position(|(f, _, _)| error.concerns(f)) else {
                    return Err(landing_err(error));
                };
                let (file, checksum, _) = new_files.remove(index);
                warn!(file = %file.relative, policy = source.on_bad_file.name(), "bad landing file set aside: {error}");
                bad_files.push((file, checksum, error.to_string()));
            }
            Err(LandFailure::Landing(error)) => return Err(landing_err(error)),
            Err(LandFailure::Run(error)) => return Err(error),
        }
    };
    let bad_note = set_aside(context, stage, &source, &bad_files).await?;
    let Some((mut appender, mut batch_id, mut rows)) = landing else {
        let mut report = StageReport::new(stage, StageOutcome::Succeeded);
        report.warnings.extend(bad_note);
        return Ok((report, BTreeMap::new()));
    };
    progress.message("committing");
    // The commit names the files it lands, so that a crash before the ledger write is repaired from the
    // Bronze log on the next run instead of landing the files twice.
    let landed_files = |rows: &[u64]| {
        let files = new_files
            .iter()
            .zip(rows)
            .map(|((file, checksum, modified), rows)| {
                serde_json::json!({
                    "source": source_name,
                    "file": file.relative,
                    "size": file.size,
                    "modified_micros": modified,
                    "checksum": checksum,
                    "rows": rows,
                })
            })
            .collect();
        vec![(
            LANDED_FILES_KEY.to_string(),
            serde_json::Value::Array(files),
        )]
    };
    // Rows carry the version of their commit (`_batch_id`), so the commit may not be rebased: when
    // another writer commits to the table first, the files are landed again at the next version.
    let mut attempts = 1;
    let metrics = loop {
        match appender.commit_with(&meta, landed_files(&rows)).await {
            Ok(metrics) => break metrics,
            Err(delta::DeltaError::Conflict { table }) if attempts < MAX_INGEST_ATTEMPTS => {
                attempts += 1;
                warn!(table = %table, attempts, "another writer committed first; landing again at the next version");
                (appender, batch_id, rows) =
                    land_files(context, stage, &path, &layout, &meta, &new_files, progress)
                        .await
                        .map_err(|failure| match failure {
                            LandFailure::Landing(error) => landing_err(error),
                            LandFailure::Run(error) => error,
                        })?;
            }
            Err(error) => return Err(delta_err(error)),
        }
    };
    crate::crash::point("after_bronze_commit");
    let entries: Vec<LedgerEntry> = new_files
        .iter()
        .zip(&rows)
        .map(|((file, checksum, modified), rows)| LedgerEntry {
            source: source_name.to_string(),
            file: file.relative.clone(),
            size: file.size,
            modified_micros: *modified,
            checksum: checksum.clone(),
            rows: *rows,
            batch_id,
            run_id: context.run_id.clone(),
        })
        .collect();
    context.state.record_ingested(&entries, &meta).await?;
    info!(
        files = entries.len(),
        rows = metrics.rows_written,
        "landed new files"
    );
    let mut report = StageReport::new(stage, StageOutcome::Succeeded);
    report.rows_read = metrics.rows_written;
    report.warnings.extend(redelivered_note);
    report.warnings.extend(bad_note);
    apply_write(&mut report, &metrics);
    Ok((report, BTreeMap::new()))
}

/// How close to the listing a file's modification time may be for the time to be trusted: two
/// seconds, more than the coarsest clock of the stores medallion reads (S3's whole seconds).
const RACY_MICROS: i64 = 2_000_000;

/// The checksum of `file` (with its SHA-256 when `legacy`), unless it is `unchanged` since it was
/// landed.
async fn checksum_unless(
    file: &LandingFile,
    unchanged: bool,
    legacy: bool,
) -> Result<Option<landing::Checksum>, landing::LandingError> {
    match unchanged {
        true => Ok(None),
        false => file.checksum(legacy).await.map(Some),
    }
}

/// Why landing files did not land.
enum LandFailure {
    /// A landing file could not be read.
    Landing(landing::LandingError),
    Run(RunError),
}

/// Streams `files` into an uncommitted Bronze append; returns it with its batch id and each file's rows.
async fn land_files(
    context: &RunContext,
    stage: &Stage,
    path: &Location,
    layout: &BronzeLayout,
    meta: &CommitMeta,
    files: &[(LandingFile, String, i64)],
    progress: &StageProgress,
) -> Result<(BatchAppender, i64, Vec<u64>), LandFailure> {
    let delta_err = |source| {
        LandFailure::Run(RunError::Delta {
            stage: stage.name.clone(),
            source,
        })
    };
    // Unless the stage names them, statistics for the lineage columns only: readers filter Bronze by
    // batch, file and time, not by raw strings, whose min and max would cost a tenth of the landing.
    let mut options = table_options(context, stage);
    options
        .stats_columns
        .get_or_insert_with(|| BronzeLayout::LINEAGE.map(String::from).to_vec());
    // Unless the stage names one, snappy: Bronze is written once per landing file and read once by
    // the stage after it, so codec time counts more than bytes (see BRONZE_CODEC).
    options.compression.get_or_insert(BRONZE_CODEC);
    let mut appender = BatchAppender::open(path, &layout.schema(), &options, meta)
        .await
        .map_err(delta_err)?
        .at_next_version();
    // Rows carry the version their commit will get: the watermark that incremental readers use.
    let batch_id = appender.base_version().map_or(0, |v| v as i64 + 1);
    let lineage = Lineage {
        run_id: context.run_id.clone(),
        batch_id,
        ingested_at_micros: state::now_micros(),
    };

    // Files are parsed on blocking threads, one file at a time each, and streamed through a small channel
    // to the Delta writer. A reader that fails stops the others at their next batch.
    let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
    let readers = Arc::new(FileReaders {
        files: files.iter().map(|(f, _, _)| f.clone()).collect(),
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
    });
    let count = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, files.len().max(1));
    let mut producers = Vec::with_capacity(count);
    for _ in 0..count {
        let (readers, sender, layout) = (readers.clone(), sender.clone(), layout.clone());
        let lineage = lineage.clone();
        producers.push(tokio::task::spawn_blocking(move || {
            readers.read(&layout, &lineage, &sender)
        }));
    }
    drop(sender);
    let mut write_error = None;
    let mut landed = 0u64;
    while let Some(batch) = receiver.recv().await {
        landed += batch.num_rows() as u64;
        if let Err(error) = appender.write(batch).await {
            write_error = Some(error);
            break;
        }
        progress.rows("landed", landed);
    }
    drop(receiver);
    let mut rows = vec![0u64; files.len()];
    let mut first_error: Option<(usize, landing::LandingError)> = None;
    for producer in producers {
        let read = producer.await.map_err(|e| {
            LandFailure::Run(RunError::Internal {
                stage: stage.name.clone(),
                message: format!("file reader stopped: {e}"),
            })
        })?;
        match read {
            Ok(counted) => {
                for (index, count) in counted {
                    rows[index] = count;
                }
            }
            // The error of the first file in DMS order, whichever reader met it first.
            Err((index, error)) => {
                if first_error.as_ref().is_none_or(|(first, _)| index < *first) {
                    first_error = Some((index, error));
                }
            }
        }
    }
    if let Some((_, error)) = first_error {
        return Err(LandFailure::Landing(error));
    }
    if let Some(error) = write_error {
        return Err(delta_err(error));
    }
    Ok((appender, batch_id, rows))
}

/// Landing files shared by the reader threads of one ingest: each takes the next file not yet taken.
struct FileReaders {
    files: Vec<LandingFile>,
    next: AtomicUsize,
    failed: AtomicBool,
}

impl FileReaders {
    /// Reads files until none is left, a reader failed or the writer stopped; returns the rows of each
    /// file read (by index), or the index of the file that failed and why.
    fn read(
        &self,
        layout: &BronzeLayout,
        lineage: &Lineage,
        sender: &tokio::sync::mpsc::Sender<RecordBatch>,
    ) -> Result<Vec<(usize, u64)>, (usize, landing::LandingError)> {
        let mut rows = Vec::new();
        loop {
            let index = self.next.fetch_add(1, Ordering::SeqCst);
            let Some(file) = self.files.get(index) else {
                return Ok(rows);
            };
            let fail = |error| {
                self.failed.store(true, Ordering::SeqCst);
                (index, error)
            };
            let mut batches = FileBatches::open(layout, file, lineage.clone(), INGEST_BATCH_ROWS)
                .map_err(fail)?;
            for batch in batches.by_ref() {
                if self.failed.load(Ordering::SeqCst)
                    || sender.blocking_send(batch.map_err(fail)?).is_err()
                {
                    return Ok(rows);
                }
            }
            rows.push((index, batches.rows()));
        }
    }
}

/// Records the files an ingest set aside (and copies them under `<lake>/quarantine/files/<source>/` for
/// `on_bad_file: quarantine`); returns the run summary's note.
async fn set_aside(
    context: &RunContext,
    stage: &Stage,
    source: &crate::config::Source,
    bad: &[(LandingFile, String, String)],
) -> Result<Option<String>, RunError> {
    if bad.is_empty() {
        return Ok(None);
    }
    let mut records = Vec::new();
    for (file, checksum, reason) in bad {
        let mut kept_at = None;
        if source.on_bad_file == BadFilePolicy::Quarantine {
            let to = context
                .pipeline
                .lake
                .join("quarantine")
                .join("files")
                .join(&source.name)
                .join(&file.relative);
            let copied = storage::copy(&file.path, &to).await;
            match copied {
                Ok(()) => kept_at = Some(to.to_string()),
                Err(e) => {
                    warn!(file = %file.relative, "could not copy the bad file to quarantine: {e}")
                }
            }
        }
        records.push(state::BadFileRecord {
            source: source.name.clone(),
            file: file.relative.clone(),
            checksum: checksum.clone(),
            reason: reason.clone(),
            policy: source.on_bad_file.name().to_string(),
            kept_at,
        });
    }
    context
        .state
        .record_bad_files(&context.run_id, &records, &commit_meta(context, stage))
        .await?;
    let names: Vec<String> = bad
        .iter()
        .map(|(f, _, _)| format!("`{}`", f.relative))
        .collect();
    Ok(Some(format!(
        "{} bad file(s) {} ({}): {}",
        bad.len(),
        match source.on_bad_file {
            BadFilePolicy::Quarantine => "quarantined",
            _ => "skipped",
        },
        names.join(", "),
        bad.iter()
            .map(|(_, _, r)| r.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// Commit-info key of a Bronze commit listing the landing files it landed.
const LANDED_FILES_KEY: &str = "medallion.landed_files";

/// Records in the ledger the files that Bronze commits after the ledger's last batch landed but the
/// ledger does not know (the run stopped between the Bronze commit and the ledger write).
async fn repair_ledger(
    context: &RunContext,
    stage: &Stage,
    source_name: &str,
    path: &Location,
    ledger: &mut std::collections::HashMap<String, LedgerEntry>,
) -> Result<(), RunError> {
    let delta_err = |source| RunError::Delta {
        stage: stage.name.clone(),
        source,
    };
    let Some(table) = delta::open(path).await.map_err(delta_err)? else {
        return Ok(());
    };
    // Batch ids are the Bronze versions the files were committed in.
    let first = ledger
        .values()
        .map(|e| e.batch_id + 1)
        .max()
        .unwrap_or(0)
        .max(0) as u64;
    let Some(commits) = delta::commits_from(&table, first)
        .await
        .map_err(delta_err)?
    else {
        return Ok(());
    };
    let mut missing = Vec::new();
    for commit in commits {
        let Some(serde_json::Value::Array(files)) = commit.info.get(LANDED_FILES_KEY) else {
            continue;
        };
        let run_id = commit
            .info
            .get("medallion.run_id")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        for file in files {
            let text = |k: &str| {
                file.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let int = |k: &str| file.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
            let name = text("file");
            // Another source's files in a Bronze table that several sources land into (commits
            // before the source was recorded name no source: they belong to the only one there was).
            let source = text("source");
            if name.is_empty()
                || ledger.contains_key(&name)
                || !(source.is_empty() || source == source_name)
            {
                continue;
            }
            missing.push(LedgerEntry {
                source: source_name.to_string(),
                file: name,
                size: int("size") as u64,
                modified_micros: int("modified_micros"),
                checksum: text("checksum"),
                rows: int("rows") as u64,
                batch_id: commit.version as i64,
                run_id: run_id.clone(),
            });
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    warn!(
        files = missing.len(),
        "ledger repaired: files landed by an interrupted run are recorded, not landed again"
    );
    context
        .state
        .record_ingested(&missing, &commit_meta(context, stage))
        .await?;
    for entry in missing {
        ledger.insert(entry.file.clone(), entry);
    }
    Ok(())
}

/// Runs a SQL stage: plan, check, write.
async fn sql_stage(
    context: &RunContext,
    stage: &Stage,
    sql: &str,
    reads: &[crate::config::TableName],
    progress: &StageProgress,
) -> StageResult {
    let name = stage.name.clone();
    let delta_err = |source| RunError::Delta {
        stage: name.clone(),
        source,
    };
    let engine_err = |source| RunError::Engine {
        stage: name.clone(),
        source,
    };

    // Inputs at their latest versions; unchanged since the last success means nothing to do.
    let mut inputs = Vec::new();
    let mut versions = BTreeMap::new();
    for table in reads {
        let path = context.pipeline.table_path(table);
        let delta_table = delta::open(&path)
            .await
            .map_err(delta_err)?
            .ok_or_else(|| RunError::MissingInput {
                stage: name.clone(),
                table: table.to_string(),
            })?;
        versions.insert(table.to_string(), delta_table.version().unwrap_or(0));
        inputs.push((table, path, delta_table));
    }
    let target_path = context.pipeline.table_path(&stage.target);
    let last = context
        .state
        .last_success(&context.pipeline.name, &stage.name)
        .await?;
    let target = delta::open(&target_path).await.map_err(delta_err)?;
    let target_exists = target.is_some();
    // A target without files (created empty, its first batch all quarantined) takes a first load too.
    let target_empty = target.as_ref().is_none_or(|t| !delta::holds_files(t));
    let rebuild = context
        .options
        .rebuild
        .as_ref()
        .filter(|_| match &stage.incremental {
            None => false,
            Some(incremental) => incremental.column().is_some() || context.options.rebuild_keyed,
        });
    if target_exists && last.as_ref() == Some(&versions) && rebuild.is_none() {
        return Ok((
            StageReport::new(stage, StageOutcome::UpToDate("inputs unchanged".into())),
            versions,
        ));
    }

    let mut scope = match &stage.incremental {
        Some(incremental) if target_exists => {
            incremental_scope(context, incremental, last.as_ref(), &versions)
                .await
                .map_err(delta_err)?
        }
        _ => None,
    };
    // A stage incremental by key, its target with deletion vectors: only changed keys recomputed
    // (a rebuild asked for, by `backfill` or `--stages`, recomputes everything).
    let mut keyed = match (&stage.incremental, &target, rebuild) {
        (Some(incremental), Some(target), None) if delta::deletion_vectors_enabled(target) => {
            keyed_scope(context, incremental, &inputs, last.as_ref(), &versions)
                .await
                .map_err(delta_err)?
        }
        _ => None,
    };
    if let (Some(scope), Some(values)) = (scope.as_mut(), rebuild) {
        scope.values.extend(values.iter().cloned().map(Some));
    }
    if let Some(scope) = &scope
        && scope.values.is_empty()
    {
        let mut report = StageReport::new(stage, StageOutcome::Succeeded);
        report.scope = Some(format!("no `{}` value touched", scope.column));
        return Ok((report, versions));
    }

    let ctx = delta::session(context.options.memory_limit).map_err(delta_err)?;
    engine::prepare(&ctx);
    let mut partials = checks::Partials::new(checks::partials_folder(&context.pipeline.lake));
    for (table, path, delta_table) in &inputs {
        let added = keyed.as_ref().and_then(|k| k.added_rows.clone());
        let (provider, whole) = match (added, &stage.incremental) {
            (Some(added), Some(incremental)) if incremental.source == **table => (added, false),
            _ => (
                delta::provider(path, delta_table)
                    .await
                    .map_err(delta_err)?,
                true,
            ),
        };
        let has_batches = provider.schema().field_with_name(BATCH_ID).is_ok();
        // An incremental stage reads only the Bronze rows committed after its last successful run.
        let after = match (&last, has_batches && stage.write.is_incremental()) {
            (Some(last), true) => last.get(&table.to_string()).map(|v| *v as i64),
            _ => None,
        };
        // A table read whole: its files' partials answer the checks' aggregates over it.
        if whole && after.is_none() {
            partials.add(&table.to_string(), path, delta_table, provider.clone());
        }
        engine::register_table(&ctx, table, provider, after.map(|v| (BATCH_ID, v)))
            .map_err(engine_err)?;
    }
    let mut output = engine::query(&ctx, &format!("sql of stage `{name}`"), sql)
        .await
        .map_err(engine_err)?;
    if let Some(incremental) = &stage.incremental
        && let Some(key) = incremental.key()
    {
        let not_row_wise = |message| RunError::NotRowWise {
            stage: name.clone(),
            message,
        };
        let plan = output
            .clone()
            .into_optimized_plan()
            .map_err(|e| engine_err(engine::EngineError::query("stage plan", e)))?;
        let source_key = source_key(context, &incremental.source).ok_or_else(|| {
            not_row_wise(format!("`{}` has no single key column", incremental.source))
        })?;
        delta::keyed::check_immutable(output.logical_plan()).map_err(not_row_wise)?;
        delta::keyed::check_row_wise(&plan, &incremental.source.to_string(), &source_key, key)
            .map_err(not_row_wise)?;
        if let Some(scope) = &keyed {
            if scope.added_rows.is_some() {
                // The stage's plan holds the source's added files; the checks read all of it.
                let table = &incremental.source;
                ctx.deregister_table(table.to_string().as_str())
                    .map_err(|e| engine_err(engine::EngineError::query("stage input", e)))?;
                engine::register_table(&ctx, table, scope.source.clone(), None)
                    .map_err(engine_err)?;
            }
            // New columns or types cannot join the old files: the whole table is rebuilt.
            let kept = target
                .as_ref()
                .is_some_and(|t| delta::keyed::keeps_schema(t, output.schema().as_arrow()));
            if !kept {
                info!("the stage's columns changed: rebuilt in full");
                keyed = None;
                output = engine::query(&ctx, &format!("sql of stage `{name}`"), sql)
                    .await
                    .map_err(engine_err)?;
            } else if scope.added.is_empty() {
                // No source row changed, only deletes: nothing to recompute.
                output = output
                    .limit(0, Some(0))
                    .map_err(|e| engine_err(engine::EngineError::query("stage output", e)))?;
            }
        }
    }
    let mut rebuilt_in_full = None;
    if let Some(wide) = scope.take_if(|s| !s.fits(&output)) {
        // So many values touched that a predicate would cost more than it saves: rebuild it all.
        rebuilt_in_full = Some(format!(
            "{} `{}` values touched: rebuilt in full",
            wide.values.len(),
            wide.column
        ));
    }
    if let Some(scope) = &scope {
        // Checks see exactly the rows that will be written.
        let predicate = scope
            .predicate(&output)
            .map_err(|message| RunError::Internal {
                stage: name.clone(),
                message,
            })?;
        output = output
            .filter(predicate)
            .map_err(|e| engine_err(engine::EngineError::query("incremental scope", e)))?;
    }

    let cdc_spec = match &stage.write {
        WriteMode::Cdc {
            keys,
            sequence_by,
            op_column,
            delete_values,
            track,
        } => Some(CdcSpec {
            keys: keys.clone(),
            sequence_by: sequence_by.clone(),
            op_column: op_column.clone(),
            delete_values: delete_values.clone(),
            track: track.clone(),
            tombstones: state::tombstones_path(&context.pipeline.lake, &stage.target),
        }),
        _ => None,
    };
    let meta = commit_meta(context, stage);
    let options = table_options(context, stage);

    // The output is read several times (expectations, the split, the cdc steps, the quarantine): it is
    // computed once, into scratch files, and every later step reads typed rows from there. A cdc
    // table's first load goes to its files as it is computed, and only a narrow copy to scratch.
    let scratch = Scratch::new(context.options.memory_limit).map_err(engine_err)?;
    let mut expectations = stage.expectations.clone();
    // The stage's columns: `output` may become a narrower copy below.
    let output_schema = output.schema().inner().clone();
    let mut staged_load = None;
    // Only a run with no success before, or whose target is gone or empty, can be a first load.
    let may_be_first = last.is_none() || target_empty;
    if let Some(spec) = cdc_spec
        .as_ref()
        .filter(|_| scope.is_none() && may_be_first)
    {
        progress.message("planning a first load");
        if let Some(written) = write_first_load(
            &ctx,
            stage,
            spec,
            &target_path,
            &options,
            &output,
            reads,
            &scratch,
            progress,
        )
        .await?
        {
            staged_load = Some(written.staged);
            output = written.copy;
            expectations = written.expectations;
        }
    }
    if staged_load.is_none() && (stage.write.is_incremental() || !stage.expectations.is_empty()) {
        progress.message("computing");
        scratch
            .materialize(&ctx, STAGE_OUTPUT, output)
            .await
            .map_err(engine_err)?;
        output = ctx
            .table(STAGE_OUTPUT)
            .await
            .map_err(|e| engine_err(engine::EngineError::query("stage output", e)))?;
    }

    progress.message("checking expectations");
    // One pass over the output for all expectations and the row count; none when neither is needed.
    let evaluation = if expectations.is_empty() && !stage.write.is_incremental() {
        checks::Evaluation::default()
    } else {
        let evaluation = checks::evaluate(&ctx, &output, &expectations).await;
        match (evaluation, staged_load.take()) {
            (Ok(mut evaluation), staged) => {
                // A first load counted its rows as it wrote them; its copy may hold only the flagged.
                if let Some(staged) = &staged {
                    evaluation.rows = staged.summary().seen;
                }
                staged_load = staged;
                evaluation
            }
            (Err(error), staged) => {
                if let Some(staged) = staged {
                    staged.discard(&target_path).await;
                }
                return Err(engine_err(error));
            }
        }
    };
    let results = &evaluation.results;
    let mut warnings = Vec::new();
    let mut failures = Vec::new();
    let mut check_results = Vec::new();
    for result in results {
        check_results.push(CheckResult {
            name: result.name.clone(),
            kind: "expectation".into(),
            severity: result.action.name().into(),
            observed: format!("{} row(s) violating", result.violations),
            threshold: "0 row(s) violating".into(),
            passed: result.violations == 0,
        });
        if result.violations == 0 {
            continue;
        }
        let mut text = result.describe();
        if let Some((file, row, _)) = &result.first
            && let Some(value) = raw_value(&ctx, reads, result.column.as_deref(), file, *row).await
        {
            text.push_str(&format!(" (raw value `{value}`)"));
        }
        match result.action {
            ExpectationAction::Fail => failures.push(text),
            ExpectationAction::Warn => {
                warn!("{text}");
                warnings.push(text);
            }
            ExpectationAction::Drop | ExpectationAction::Quarantine => info!("{text}"),
        }
    }
    if !failures.is_empty() {
        if let Some(staged) = staged_load {
            staged.discard(&target_path).await;
        }
        return Err(RunError::Checks {
            stage: name.clone(),
            message: format!("{}; nothing was written", failures.join("; ")),
        });
    }
    let rows_out = if stage.write.is_incremental() {
        evaluation.rows
    } else {
        0
    };
    let split = match checks::split(&ctx, output, &expectations, &evaluation).await {
        Ok(split) => split,
        Err(error) => {
            if let Some(staged) = staged_load {
                staged.discard(&target_path).await;
            }
            return Err(engine_err(error));
        }
    };
    let output = split.kept;

    // Write-audit-publish: the candidate result is checked before anything is committed.
    let mut report = StageReport::new(stage, StageOutcome::Succeeded);
    report.warnings = warnings;
    report.rows_dropped = split.dropped;
    report.rows_quarantined = split.quarantined;
    let prepared = match &cdc_spec {
        Some(spec) => {
            progress.message("classifying changes");
            let kept = evaluation.rows - split.dropped - split.quarantined;
            delta::prepare_changes(
                &target_path,
                &ctx,
                &scratch,
                output.clone(),
                kept,
                spec,
                &options,
                staged_load,
            )
            .await
            .map_err(delta_err)?
        }
        None => None,
    };
    if let Some(prepared) = &prepared {
        let m = prepared.metrics();
        let kept = rows_out - split.dropped - split.quarantined;
        let accounted = m.rows_superseded
            + m.rows_stale
            + m.tombstones_added
            + prepared.applied_rows()
            + split.dropped
            + split.quarantined;
        check_results.push(CheckResult {
            name: "rows_accounted".into(),
            kind: "accounting".into(),
            severity: "error".into(),
            observed: format!(
                "{rows_out} read = {} applied + {} superseded + {} stale + {} tombstoned + {} quarantined + {} dropped",
                prepared.applied_rows(),
                m.rows_superseded,
                m.rows_stale,
                m.tombstones_added,
                split.quarantined,
                split.dropped
            ),
            threshold: format!("{rows_out} read"),
            passed: accounted == rows_out && m.rows_read == kept,
        });
    }
    // A stage whose rows each depend only on the source rows of their `incremental.column` value may
    // be computed a range of values at a time (see `delta::Slices`).
    let slices = match stage
        .incremental
        .as_ref()
        .filter(|_| context.options.slice_rows > 0)
        .and_then(|incremental| Some((incremental, incremental.column()?)))
    {
        Some((incremental, column)) => {
            match inputs.iter().find(|(t, ..)| **t == incremental.source) {
                Some((_, path, table)) => {
                    delta::Slices::plan(path, table, column, context.options.slice_rows)
                        .map_err(delta_err)?
                }
                None => None,
            }
        }
        None => None,
    };
    // A whole-table overwrite is written before its checks run: they read a copy of the columns they
    // name, taken as the rows go to the new files, which are published only if the checks pass. Other
    // writes are checked on the candidate as a query, and written after.
    let mut staged = None;
    if !stage.checks.is_empty() {
        progress.message("checking the candidate");
        let registered = async {
            register_check_tables(context, &ctx, stage, &mut partials)
                .await
                .map_err(delta_err)?;
            let staged = match keyed {
                // A keyed refresh adds to the table's files: its candidate is a query.
                Some(_) => None,
                None => {
                    stage_replacement(
                        &ctx,
                        stage,
                        &target_path,
                        &output,
                        &options,
                        scope.as_ref(),
                        slices.clone(),
                        &scratch,
                        progress,
                    )
                    .await?
                }
            };
            if staged.is_none() {
                let candidate_err =
                    |e| engine_err(engine::EngineError::query("candidate result", e));
                let candidate = candidate_sql(
                    &ctx,
                    stage,
                    &target_path,
                    target_exists,
                    &output,
                    scope.as_ref(),
                    keyed.as_ref(),
                    prepared.as_ref(),
                    &mut partials,
                )
                .await
                .map_err(delta_err)?;
                let candidate = ctx.sql(&candidate).await.map_err(candidate_err)?;
                ctx.register_table(checks::CANDIDATE, candidate.into_view())
                    .map_err(candidate_err)?;
            }
            Ok(staged)
        }
        .await;
        staged = match registered {
            Ok(staged) => staged,
            Err(error) => {
                // A staged first load whose checks cannot be set up is not published either.
                if let Some(prepared) = prepared {
                    prepared.discard().await;
                }
                return Err(error);
            }
        };
        let evaluated = async {
            let previous = context
                .state
                .last_check_values(&context.pipeline.name, &stage.name)
                .await?;
            checks::evaluate_checks(&ctx, &stage.checks, &previous, &partials)
                .await
                .map_err(engine_err)
        };
        match evaluated.await {
            Ok(results) => check_results.extend(results),
            Err(error) => {
                // Files written for a check that could not run are not published either.
                if let Some((staged, _)) = staged {
                    staged.discard().await;
                }
                if let Some(prepared) = prepared {
                    prepared.discard().await;
                }
                return Err(error);
            }
        }
    }
    for result in check_results.iter().filter(|r| !r.passed && !r.blocks()) {
        warn!("{}", result.describe());
        report.warnings.push(result.describe());
    }
    let blocking: Vec<String> = check_results
        .iter()
        .filter(|r| r.blocks())
        .map(CheckResult::describe)
        .collect();
    report.checks = check_results;
    if !blocking.is_empty() {
        if let Some((staged, _)) = staged {
            staged.discard().await;
        }
        if let Some(prepared) = prepared {
            prepared.discard().await;
        }
        report.outcome =
            StageOutcome::Failed(format!("{}; nothing was published", blocking.join("; ")));
        return Ok((report, BTreeMap::new()));
    }

    progress.message(&format!("writing ({})", stage.write.name()));
    let mut sliced = None;
    match &stage.write {
        WriteMode::Overwrite if keyed.is_some() => {
            crate::crash::point("before_gold_commit");
            // A keyed scope is only made for an incremental stage whose target exists.
            let (Some(keyed), Some(incremental), Some(table)) =
                (&keyed, &stage.incremental, &target)
            else {
                return Err(RunError::Internal {
                    stage: name.clone(),
                    message: "a keyed refresh without its target or source".into(),
                });
            };
            let metrics = delta::keyed::write(
                &target_path,
                table,
                output,
                keyed,
                options.target_file_size,
                &meta,
            )
            .await
            .map_err(delta_err)?;
            report.scope = Some(format!(
                "{} changed `{}` value(s) recomputed from {} file(s) of `{}`, {} row(s) \
                 replaced or deleted",
                keyed.replaced_count,
                keyed.key,
                keyed.added.len(),
                incremental.source,
                metrics.rows_deleted
            ));
            apply_write(&mut report, &metrics);
            // The source rows read: the live rows of its added files.
            report.rows_read = keyed.replaced_count as u64;
        }
        WriteMode::Overwrite => {
            crate::crash::point("before_gold_commit");
            let metrics = match staged {
                Some((staged, slices)) => {
                    sliced = Some(slices);
                    staged.commit(&meta).await
                }
                None => overwrite_unchecked(
                    &target_path,
                    output,
                    &options,
                    &meta,
                    scope.as_ref(),
                    slices,
                )
                .await
                .map(|(metrics, slices)| {
                    sliced = Some(slices);
                    metrics
                }),
            }
            .map_err(delta_err)?;
            if let Some(scope) = &scope {
                report.scope = Some(format!(
                    "{} `{}` value(s) recomputed",
                    scope.values.len(),
                    scope.column
                ));
            }
            report.scope = rebuilt_in_full.or(report.scope.take());
            if let (Some(slices @ 2..), Some(column)) =
                (sliced, stage.incremental.as_ref().and_then(|i| i.column()))
            {
                let sliced = format!("computed in {slices} slices of `{column}`");
                report.scope = Some(match report.scope.take() {
                    Some(scope) => format!("{scope}, {sliced}"),
                    None => sliced,
                });
            }
            report.rows_read = metrics.rows_written;
            apply_write(&mut report, &metrics);
        }
        WriteMode::Append => {
            let metrics = delta::append_frame(&target_path, output, &options, &meta)
                .await
                .map_err(delta_err)?;
            report.rows_read = rows_out;
            apply_write(&mut report, &metrics);
        }
        WriteMode::Merge { keys } => {
            let metrics = delta::upsert(&target_path, output, keys, &options, &meta)
                .await
                .map_err(delta_err)?;
            apply_write(&mut report, &metrics);
            report.rows_read = rows_out;
        }
        WriteMode::Cdc { .. } => {
            report.rows_read = rows_out;
            if let Some(prepared) = prepared {
                let metrics = prepared.commit(&ctx, &meta).await.map_err(delta_err)?;
                report.rows_superseded = metrics.rows_superseded;
                report.rows_stale = metrics.rows_stale;
                report.tombstones_added = metrics.tombstones_added;
                report.files_removed = metrics.files_removed;
                report.files_scanned = metrics.files_scanned;
                apply_write(&mut report, &metrics.write);
            } else if let Some(spec) = cdc_spec.as_ref().filter(|_| !target_exists) {
                // Nothing to apply (every change dropped or quarantined): a first run still leaves
                // the table, empty.
                report.output_version =
                    delta::create_empty(&target_path, &output_schema, spec, &options)
                        .await
                        .map_err(delta_err)?;
            }
        }
    }
    if let Some(rejected) = split.rejected
        && split.quarantined > 0
    {
        progress.message("quarantining rejected rows");
        let table = checks::quarantine_table(&stage.target);
        let bronze = reads.iter().find(|t| t.schema == "bronze");
        let history_days = context.pipeline.maintenance.vacuum_retention_days;
        checks::write_quarantine(
            &ctx,
            rejected,
            bronze,
            &context.pipeline.table_path(&table),
            history_days,
            &meta,
        )
        .await
        .map_err(delta_err)?;
        report.warnings.push(format!(
            "{} row(s) quarantined to `{table}`",
            split.quarantined
        ));
    }
    Ok((report, versions))
}

/// Writes an overwrite that has no checks: a whole rebuild that may be cut into slices through
/// [`delta::Replacement`] (computed a slice at a time, committed at once), any other through
/// [`delta::overwrite`]. Returns its metrics and the number of slices it was computed in.
async fn overwrite_unchecked(
    target_path: &Location,
    output: datafusion::prelude::DataFrame,
    options: &TableOptions,
    meta: &CommitMeta,
    scope: Option<&delta::Scope>,
    slices: Option<delta::Slices>,
) -> Result<(WriteMetrics, usize), delta::DeltaError> {
    if let Some(slices) = slices
        && let Some(mut replacement) =
            delta::Replacement::plan(target_path, output.clone(), options, scope, Some(slices))
                .await?
    {
        let (streams, count) = replacement.execute().await?;
        let staged = replacement.write(streams).await?;
        return Ok((staged.commit(meta).await?, count));
    }
    Ok((
        delta::overwrite(target_path, output, options, meta, scope).await?,
        1,
    ))
}

/// Writes a whole-table overwrite before its checks run ([`delta::Replacement`]): while the rows go to
/// the new files, the columns the checks read are copied into `scratch`, registered as `candidate`,
/// `batch` and `changed`. Returns the staged files and the number of slices the rows were computed in.
/// `None` (nothing written) when the stage's write is not such an overwrite, or when the checks'
/// columns cannot be told; its candidate is then checked as a query.
#[allow(clippy::too_many_arguments)]
async fn stage_replacement(
    ctx: &datafusion::prelude::SessionContext,
    stage: &Stage,
    target_path: &Location,
    output: &datafusion::prelude::DataFrame,
    options: &TableOptions,
    scope: Option<&delta::Scope>,
    slices: Option<delta::Slices>,
    scratch: &Scratch,
    progress: &StageProgress,
) -> Result<Option<(delta::Staged, usize)>, RunError> {
    let delta_err = |source| RunError::Delta {
        stage: stage.name.clone(),
        source,
    };
    let engine_err = |source| RunError::Engine {
        stage: stage.name.clone(),
        source,
    };
    let candidate_err = |e| engine_err(engine::EngineError::query("candidate result", e));
    if !matches!(stage.write, WriteMode::Overwrite) {
        return Ok(None);
    }
    let Some(mut replacement) =
        delta::Replacement::plan(target_path, output.clone(), options, scope, slices)
            .await
            .map_err(delta_err)?
    else {
        return Ok(None);
    };
    let schema = Arc::new(output.schema().as_arrow().clone());
    let Some(read) = checks::columns_read(ctx, &stage.checks, schema, &checks::RELATIONS).await
    else {
        return Ok(None);
    };
    progress.message("writing the candidate");
    let (streams, slices) = replacement.execute().await.map_err(delta_err)?;
    let (streams, copies) =
        engine::scratch::tee(streams, &read.columns, None).map_err(candidate_err)?;
    let (staged, _) = tokio::try_join!(
        async { replacement.write(streams).await.map_err(delta_err) },
        async {
            scratch
                .materialize_streams(ctx, checks::CANDIDATE, copies)
                .await
                .map_err(engine_err)
        },
    )?;
    let candidate = ctx
        .table_provider(checks::CANDIDATE)
        .await
        .map_err(candidate_err)?;
    ctx.register_table(checks::BATCH, candidate.clone())
        .map_err(candidate_err)?;
    ctx.register_table(checks::CHANGED, candidate)
        .map_err(candidate_err)?;
    progress.message("checking the candidate");
    Ok(Some((staged, slices)))
}

/// A cdc stage's first load, written to its table's files as it is computed.
struct FirstLoadWritten {
    staged: delta::StagedLoad,
    /// The copy in scratch, registered as the stage's output.
    copy: datafusion::prelude::DataFrame,
    /// The expectations restated over the copy's boolean columns.
    expectations: Vec<crate::config::Expectation>,
}

/// A cdc stage's first load written to its table's files as it is computed ([`delta::FirstLoad`]),
/// uncommitted. Every expectation is evaluated in the same pass, into a boolean column of the output;
/// what goes to scratch, registered as the stage's output, is a narrow copy (the cdc columns, the
/// lineage, the columns the checks read and those booleans) of every row when a check reads the
/// stage's output (`batch`) or the write cannot sum the load up ([`delta::LoadCopy::Every`]), else of
/// the rows an expectation flags and the deletes alone ([`delta::LoadCopy::Flagged`]). `None`
/// (nothing published) when the load cannot go this way: see [`delta::FirstLoad::plan`], and
/// quarantined rows need the lineage and the Bronze table their raw values are read from, and the
/// checks' columns must be known; or when its write did not find what its plan did (a key twice, or
/// with the flagged rows alone a key outside the plan's bounds): its files are removed, and the
/// general path computes it again.
#[allow(clippy::too_many_arguments)]
async fn write_first_load(
    ctx: &datafusion::prelude::SessionContext,
    stage: &Stage,
    spec: &CdcSpec,
    target_path: &Location,
    options: &TableOptions,
    output: &datafusion::prelude::DataFrame,
    reads: &[crate::config::TableName],
    scratch: &Scratch,
    progress: &StageProgress,
) -> Result<Option<FirstLoadWritten>, RunError> {
    const COMPUTED: &str = "__medallion_first_load";
    const KEPT: &str = "__medallion_kept";
    const DELETE: &str = "__medallion_delete";
    const COPIED: &str = "__medallion_copied";
    let delta_err = |source| RunError::Delta {
        stage: stage.name.clone(),
        source,
    };
    let query_err = |e| RunError::Engine {
        stage: stage.name.clone(),
        source: engine::EngineError::query("first load", e),
    };
    let schema = output.schema().as_arrow().clone();
    let lineage = [landing::SOURCE_FILE, landing::SOURCE_ROW];
    let has_lineage = lineage.iter().all(|c| schema.field_with_name(c).is_ok());
    let quarantines = stage
        .expectations
        .iter()
        .any(|e| e.action == ExpectationAction::Quarantine);
    if quarantines && !(has_lineage && reads.iter().any(|t| t.schema == "bronze")) {
        return Ok(None);
    }
    let Some(checked) = checks::columns_read(
        ctx,
        &stage.checks,
        Arc::new(schema.clone()),
        &checks::RELATIONS,
    )
    .await
    else {
        return Ok(None);
    };
    let Some(load) = delta::FirstLoad::plan(target_path, output, spec, options)
        .await
        .map_err(delta_err)?
    else {
        return Ok(None);
    };
    // The checks read the rows the load adds from its files, but the stage's output only from the copy.
    let copy = if load.summarizes() && !checked.tables.contains(checks::BATCH) {
        delta::LoadCopy::Flagged
    } else {
        delta::LoadCopy::Every
    };
    progress.message("writing the first load");

    // The output, each expectation's verdict, whether the row is kept (it passes every expectation
    // that removes rows) and whether it is a delete: the kept rows that are not deletes go to the table.
    let verdict = |i: usize| format!("__medallion_expectation_{i}");
    let mut columns = vec!["*".to_string()];
    let mut removing = Vec::new();
    for (i, expectation) in stage.expectations.iter().enumerate() {
        columns.push(format!(
            "COALESCE(({}), FALSE) AS {}",
            expectation.expr,
            verdict(i)
        ));
        if matches!(
            expectation.action,
            ExpectationAction::Drop | ExpectationAction::Quarantine
        ) {
            removing.push(verdict(i));
        }
    }
    ctx.register_table(COMPUTED, output.clone().into_view())
        .map_err(query_err)?;
    // A row is copied when the steps after the write look at it: an expectation flags it (they count
    // and quarantine it), or it is a delete (a tombstone), or every row is.
    let copied = match copy {
        delta::LoadCopy::Every => String::new(),
        delta::LoadCopy::Flagged => {
            let written: Vec<String> = (0..stage.expectations.len())
                .map(verdict)
                .chain([format!("NOT {DELETE}")])
                .collect();
            format!(", NOT ({}) AS {COPIED}", written.join(" AND "))
        }
    };
    // An expectation that does not plan is reported by the general path, as it reports it.
    let Ok(computed) = ctx
        .sql(&format!(
            "SELECT *{copied} FROM \
             (SELECT *, {} AS {KEPT}, {} AS {DELETE} FROM (SELECT {} FROM {COMPUTED}))",
            if removing.is_empty() {
                "TRUE".to_string()
            } else {
                removing.join(" AND ")
            },
            delta::is_delete_sql(spec, ""),
            columns.join(", ")
        ))
        .await
    else {
        return Ok(None);
    };
    let computed_schema = computed.schema().as_arrow().clone();
    let mut narrow: Vec<usize> = Vec::new();
    let wanted = spec
        .keys
        .iter()
        .chain(&spec.sequence_by)
        .chain(std::iter::once(&spec.op_column))
        .chain(&spec.track)
        .map(String::as_str)
        .chain(lineage.iter().copied().filter(|_| has_lineage))
        .map(String::from)
        // Also in a copy of the flagged rows: a load that keeps no row has no files, and its checks
        // read this copy instead.
        .chain(
            checked
                .columns
                .iter()
                .map(|&i| schema.field(i).name().clone()),
        )
        .chain((0..stage.expectations.len()).map(verdict));
    for name in wanted {
        let index = computed_schema
            .index_of(&name)
            .map_err(|e| query_err(e.into()))?;
        if !narrow.contains(&index) {
            narrow.push(index);
        }
    }
    let streams = computed
        .execute_stream_partitioned()
        .await
        .map_err(query_err)?;
    let only = match copy {
        delta::LoadCopy::Every => None,
        delta::LoadCopy::Flagged => Some(
            computed_schema
                .index_of(COPIED)
                .map_err(|e| query_err(e.into()))?,
        ),
    };
    let (streams, copies) = engine::scratch::tee(streams, &narrow, only).map_err(query_err)?;
    let (staged, copied) = tokio::join!(
        load.write(streams, KEPT, DELETE, copy),
        scratch.materialize_streams(ctx, FIRST_LOAD_COPY, copies),
    );
    let staged = staged.map_err(delta_err)?;
    let copied = match copied {
        Ok(copied) => copied,
        Err(source) => {
            staged.discard(target_path).await;
            return Err(RunError::Engine {
                stage: stage.name.clone(),
                source,
            });
        }
    };
    let summary = staged.summary();
    debug!(
        stage = %stage.name,
        "first load: {copied} of {} row(s) copied to scratch ({copy:?})",
        summary.seen
    );
    // A write that found a key twice (its plan found each once: a stage's SQL need not give the same
    // rows twice) cannot publish its files; nor can a copy of the flagged rows stand in for the
    // classification when the summary could not count the keys (one outside the plan's bounds).
    let repeated = summary.repeated.is_some_and(|n| n > 0);
    if repeated || (copy == delta::LoadCopy::Flagged && summary.repeated.is_none()) {
        info!(
            stage = %stage.name,
            "the first load's rows differ from its plan's; computing it again"
        );
        staged.discard(target_path).await;
        let _ = ctx.deregister_table(FIRST_LOAD_COPY);
        let _ = ctx.deregister_table(COMPUTED);
        return Ok(None);
    }
    let frame = match ctx.table(FIRST_LOAD_COPY).await {
        Ok(frame) => frame,
        Err(error) => {
            staged.discard(target_path).await;
            return Err(query_err(error));
        }
    };
    let evaluated = stage
        .expectations
        .iter()
        .enumerate()
        .map(|(i, e)| crate::config::Expectation {
            expr: verdict(i),
            ..e.clone()
        })
        .collect();
    Ok(Some(FirstLoadWritten {
        staged,
        copy: frame,
        expectations: evaluated,
    }))
}

/// The target as the stage read it, registered for its candidate's SQL.
const CURRENT: &str = "__medallion_current";

/// SQL for the stage's candidate result: the target as it would be after the write.
#[allow(clippy::too_many_arguments)]
async fn candidate_sql(
    ctx: &datafusion::prelude::SessionContext,
    stage: &Stage,
    target_path: &Location,
    target_exists: bool,
    output: &datafusion::prelude::DataFrame,
    scope: Option<&delta::Scope>,
    keyed: Option<&delta::keyed::KeyedScope>,
    prepared: Option<&delta::PreparedChanges>,
    partials: &mut checks::Partials,
) -> Result<String, delta::DeltaError> {
    let query = |e| delta::DeltaError::query(target_path, e);
    ctx.register_table(checks::BATCH, output.clone().into_view())
        .map_err(query)?;
    if let Some(prepared) = prepared {
        let changed = prepared.changed(ctx).await?;
        ctx.register_table(checks::CHANGED, changed.into_view())
            .map_err(query)?;
        return Ok(prepared.candidate_sql(checks::CHANGED));
    }
    // Every other write adds its batch as it is; an empty cdc batch adds nothing.
    let changed = match stage.write {
        WriteMode::Cdc { .. } => output.clone().limit(0, Some(0)).map_err(query)?,
        _ => output.clone(),
    };
    ctx.register_table(checks::CHANGED, changed.into_view())
        .map_err(query)?;
    let current = match delta::open(target_path).await? {
        Some(table) if target_exists => {
            let provider = delta::provider(target_path, &table).await?;
            Some((table, provider))
        }
        _ => None,
    };
    let columns: Vec<String> = output
        .schema()
        .fields()
        .iter()
        .map(|f| format!("\"{}\"", f.name().replace('"', "\"\"")))
        .collect();
    let cols = columns.join(", ");
    let Some((table, current)) = current else {
        return Ok("SELECT * FROM batch".into());
    };
    ctx.register_table(CURRENT, current.clone())
        .map_err(query)?;
    Ok(match (&stage.write, scope) {
        (WriteMode::Overwrite, _) if let Some(keyed) = keyed => {
            let split = keyed.split_files(target_path, &table);
            let rows_kept = |name: &str| keyed.kept_sql(ctx, name, &cols);
            let kept = kept_whole(ctx, target_path, &table, split, rows_kept, &cols, partials);
            format!("{} UNION ALL SELECT {cols} FROM batch", kept.await)
        }
        (WriteMode::Overwrite, None) => "SELECT * FROM batch".into(),
        (WriteMode::Overwrite, Some(scope)) => {
            // Typed as the target holds the column, as the split of its files by statistics is.
            let stored = current.schema();
            let data_type = stored
                .field_with_name(&scope.column)
                .or_else(|_| output.schema().as_arrow().field_with_name(&scope.column))
                .map(|f| f.data_type().clone())
                .unwrap_or(datafusion::arrow::datatypes::DataType::Utf8);
            let outside = format!("NOT COALESCE({}, FALSE)", scope.sql(&data_type));
            let split = scope_split(ctx, target_path, &table, &current, scope);
            let rows_kept = |name: &str| format!("SELECT {cols} FROM {name} WHERE {outside}");
            let kept = kept_whole(ctx, target_path, &table, split, rows_kept, &cols, partials);
            format!("{} UNION ALL SELECT {cols} FROM batch", kept.await)
        }
        (WriteMode::Append, _) => {
            format!("SELECT {cols} FROM {CURRENT} UNION ALL SELECT {cols} FROM batch")
        }
        (WriteMode::Merge { keys }, _) => {
            let join: Vec<String> = keys
                .iter()
                .map(|k| format!("b.\"{k}\" = t.\"{k}\""))
                .collect();
            format!(
                "SELECT {cols} FROM {CURRENT} t WHERE NOT EXISTS (SELECT 1 FROM batch b WHERE {}) \
                 UNION ALL SELECT {cols} FROM batch",
                join.join(" AND ")
            )
        }
        // An empty change batch (every row quarantined or dropped) leaves the table as it is.
        (WriteMode::Cdc { .. }, _) => format!("SELECT * FROM {CURRENT}"),
    })
}

/// The rows of the target that stay after a partial rebuild or a keyed refresh, as SQL, from `split`:
/// the target's files that the write leaves as they are (by the log's statistics), read whole, their
/// checks' partials kept between runs ([`checks::Partials`]); then the other files, filtered by
/// `rows_kept` (the SQL of a table's rows that stay, given its name). Without a split (`None`, or no
/// file left whole, or a file that cannot be read alone), `rows_kept` of the whole target
/// (`__medallion_current`); the split is an optimization, so a failure is only warned of.
async fn kept_whole(
    ctx: &datafusion::prelude::SessionContext,
    path: &Location,
    table: &deltalake::DeltaTable,
    split: Result<Option<delta::FileSplit>, delta::DeltaError>,
    rows_kept: impl Fn(&str) -> String,
    cols: &str,
    partials: &mut checks::Partials,
) -> String {
    const WHOLE: &str = "__medallion_current_whole";
    const CUT: &str = "__medallion_current_cut";
    let query = |e| delta::DeltaError::query(path, e);
    let result = async {
        let Some(delta::FileSplit { whole, cut }) = split? else {
            return Ok(None);
        };
        if whole.is_empty() {
            return Ok(None);
        }
        let Some(whole_files) = delta::files_provider(path, table, &whole).await? else {
            return Ok(None);
        };
        let mut sql = format!("SELECT {cols} FROM {WHOLE}");
        if !cut.is_empty() {
            let Some(cut_files) = delta::files_provider(path, table, &cut).await? else {
                return Ok(None);
            };
            ctx.register_table(CUT, cut_files).map_err(query)?;
            sql.push_str(&format!(" UNION ALL {}", rows_kept(CUT)));
        }
        ctx.register_table(WHOLE, whole_files.clone())
            .map_err(query)?;
        partials.add_files(WHOLE, path, table, whole_files, &whole);
        debug!(
            files_whole = whole.len(),
            files_cut = cut.len(),
            "the target's rows that stay, for the checks"
        );
        Ok(Some(sql))
    };
    let kept = result.await.unwrap_or_else(|error: delta::DeltaError| {
        warn!("the target's files are all read with the write's filter: {error}");
        None
    });
    kept.unwrap_or_else(|| rows_kept(CURRENT))
}

/// The target's files split by `scope`: `whole`, those no row of a recomputed value can be in;
/// `cut`, the others. `None` when the scope has no predicate over the target.
fn scope_split(
    ctx: &datafusion::prelude::SessionContext,
    path: &Location,
    table: &deltalake::DeltaTable,
    current: &Arc<dyn datafusion::catalog::TableProvider>,
    scope: &delta::Scope,
) -> Result<Option<delta::FileSplit>, delta::DeltaError> {
    let frame = ctx
        .read_table(current.clone())
        .map_err(|e| delta::DeltaError::query(path, e))?;
    let Ok(predicate) = scope.predicate(&frame) else {
        return Ok(None);
    };
    delta::files_by_predicate(path, table, &predicate, current.schema()).map(Some)
}

/// Registers the pipeline tables that the stage's checks read but its SQL does not.
async fn register_check_tables(
    context: &RunContext,
    ctx: &datafusion::prelude::SessionContext,
    stage: &Stage,
    partials: &mut checks::Partials,
) -> Result<(), delta::DeltaError> {
    let mut tables = std::collections::BTreeSet::new();
    for check in &stage.checks {
        let mut queries = vec![check.query.as_str()];
        if let crate::config::CheckRule::Equals { query, .. } = &check.rule {
            queries.push(query);
        }
        for query in queries {
            tables.extend(engine::sql::table_references(query).unwrap_or_default());
        }
    }
    for name in tables {
        let Some(table) = crate::config::TableName::parse(&name) else {
            continue;
        };
        if stage.reads().contains(&table) {
            continue;
        }
        let path = context.pipeline.table_path(&table);
        if let Some(delta_table) = delta::open(&path).await? {
            let provider = delta::provider(&path, &delta_table).await?;
            if engine::register_table(ctx, &table, provider.clone(), None).is_ok() {
                partials.add(&table.to_string(), &path, &delta_table, provider);
            }
        }
    }
    Ok(())
}

/// The values of an incremental stage's column to recompute, from the commits its cdc source made since
/// the stage's last success. `None` means recompute everything: no earlier success, another input
/// changed, or the source's commits do not say what they touched.
async fn incremental_scope(
    context: &RunContext,
    incremental: &Incremental,
    last: Option<&BTreeMap<String, u64>>,
    versions: &BTreeMap<String, u64>,
) -> Result<Option<delta::Scope>, delta::DeltaError> {
    let Some(column) = incremental.column() else {
        return Ok(None);
    };
    let Some(after) = source_after(incremental, last, versions) else {
        return Ok(None);
    };
    let path = context.pipeline.table_path(&incremental.source);
    let Some(table) = delta::open(&path).await? else {
        return Ok(None);
    };
    let values = delta::touched_since(&table, after, column).await?;
    Ok(values.map(|values| delta::Scope {
        column: column.to_string(),
        values,
    }))
}

/// What a stage incremental by key recomputes and deletes, from the changes its cdc source made since
/// the stage's last success. `None` means recompute everything, as for [`incremental_scope`].
async fn keyed_scope(
    context: &RunContext,
    incremental: &Incremental,
    inputs: &[(&crate::config::TableName, Location, deltalake::DeltaTable)],
    last: Option<&BTreeMap<String, u64>>,
    versions: &BTreeMap<String, u64>,
) -> Result<Option<delta::keyed::KeyedScope>, delta::DeltaError> {
    let (Some(key), Some(source_key)) =
        (incremental.key(), source_key(context, &incremental.source))
    else {
        return Ok(None);
    };
    let Some(after) = source_after(incremental, last, versions) else {
        return Ok(None);
    };
    // The source as the stage's SQL reads it, at the version the run records.
    let Some((_, path, table)) = inputs.iter().find(|(t, ..)| **t == incremental.source) else {
        return Ok(None);
    };
    delta::keyed::scope(path, table, after, &source_key, key).await
}

/// The version of an incremental stage's source at the stage's last success, when the stage's other
/// inputs have not changed since (`last`: the versions it read then; `versions`: now).
fn source_after(
    incremental: &Incremental,
    last: Option<&BTreeMap<String, u64>>,
    versions: &BTreeMap<String, u64>,
) -> Option<u64> {
    let last = last?;
    let source = incremental.source.to_string();
    let others_unchanged = versions
        .iter()
        .filter(|(table, _)| **table != source)
        .all(|(table, version)| last.get(table) == Some(version));
    others_unchanged
        .then(|| last.get(&source).copied())
        .flatten()
}

/// The key column of `table`, written by a cdc stage with one key.
fn source_key(context: &RunContext, table: &crate::config::TableName) -> Option<String> {
    context
        .pipeline
        .stages
        .iter()
        .find(|stage| stage.target == *table)
        .and_then(|stage| match &stage.write {
            WriteMode::Cdc { keys, .. } if keys.len() == 1 => keys.first().cloned(),
            _ => None,
        })
}

fn apply_write(report: &mut StageReport, metrics: &WriteMetrics) {
    if let Some(rows) = metrics.rows_source {
        report.rows_read = rows;
    }
    report.rows_written = metrics.rows_written;
    report.rows_inserted = metrics.rows_inserted;
    report.rows_updated = metrics.rows_updated;
    report.rows_deleted = metrics.rows_deleted;
    report.output_version = metrics.version;
}

/// The raw Bronze value of `column` at (`file`, `row`), for error messages; best effort.
async fn raw_value(
    ctx: &datafusion::prelude::SessionContext,
    reads: &[crate::config::TableName],
    column: Option<&str>,
    file: &str,
    row: i64,
) -> Option<String> {
    use datafusion::arrow::{array::StringArray, compute::cast, datatypes::DataType};
    let column = column?;
    for table in reads.iter().filter(|t| t.schema == "bronze") {
        let sql = format!(
            "SELECT \"{column}\" FROM {table} WHERE _source_file = '{}' AND _source_row = {row} LIMIT 1",
            file.replace('\'', "''")
        );
        let Ok(df) = ctx.sql(&sql).await else {
            continue;
        };
        let Ok(batches) = df.collect().await else {
            continue;
        };
        let batch = batches.iter().find(|b| b.num_rows() > 0)?;
        let text = cast(batch.column(0), &DataType::Utf8).ok()?;
        let text = text.as_any().downcast_ref::<StringArray>()?;
        return Some(text.value(0).to_string());
    }
    None
}
