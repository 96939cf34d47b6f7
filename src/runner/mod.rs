//! Orchestration: schedules the pipeline's stages from a ready queue (independent stages in parallel up to
//! `max_parallel`), runs each one (`stage.rs`), skips everything downstream of a failure and nothing else,
//! and records the run in the state tables. Returns a [`RunReport`]; printing is the CLI's job.

pub mod backfill;
pub mod history;
pub mod lock;
pub mod plan;
mod progress;
mod report;
mod stage;

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

pub use report::{RunReport, StageOutcome, StageReport};

use crate::{
    config::Pipeline,
    dag::ReadyQueue,
    delta::{CommitMeta, DeltaError},
    engine::EngineError,
    landing::LandingError,
    notify,
    state::{self, RunRecord, StateError, StateStore},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "stage `{stage}`: table `{table}` does not exist yet; run the stage that writes it first (check the stage order)"
    )]
    MissingInput { stage: String, table: String },
    #[error(
        "source `{source_name}`: landing file `{file}` was already ingested but its content changed ({detail}); DMS never rewrites a file, so restore the original or deliver the new data under a new name"
    )]
    ChangedFile {
        source_name: String,
        file: String,
        detail: String,
    },
    #[error("stage `{stage}`: {message}")]
    Checks { stage: String, message: String },
    #[error("stage `{stage}`: {source}")]
    Landing { stage: String, source: LandingError },
    #[error("stage `{stage}`: {source}")]
    Delta { stage: String, source: DeltaError },
    #[error("stage `{stage}`: {source}")]
    Engine { stage: String, source: EngineError },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("stage `{stage}`: internal error: {message}")]
    Internal { stage: String, message: String },
    #[error(
        "stage `{stage}`: `incremental.key` needs its SQL to give at most one row per row of its source, keyed by the source's key: {message}; nothing was written"
    )]
    NotRowWise { stage: String, message: String },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// Stages run side by side unless told otherwise: half the cores, at least one. Each stage's queries
/// already use every core, so two stages at once on two cores only split them and add up their memory
/// (the incremental benchmark: 1.15 GiB against 0.9 GiB peak, and no faster; BENCHMARKS.md, item 30).
pub fn default_max_parallel() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub max_parallel: usize,
    /// Show progress on the terminal.
    pub progress: bool,
    /// Logical date (`--date`): only landing files dated on or before it are ingested.
    pub logical_date: Option<chrono::NaiveDate>,
    /// Stages to run (`--select`); `None` runs them all.
    pub select: Option<BTreeSet<String>>,
    /// Values of incremental stages' columns to recompute whether or not changes touched them
    /// (`backfill --stages gold`, `--force`).
    pub rebuild: Option<BTreeSet<String>>,
    /// Whether `rebuild` also applies to stages incremental by key alone, which have no column whose
    /// values to recompute and so are rebuilt in full: once per backfill, not once per date.
    pub rebuild_keyed: bool,
    /// How long to wait for another run of the pipeline to finish.
    pub lock_timeout: std::time::Duration,
    /// Memory pool of each stage's query execution (spilling past it), in bytes; `None`: unbounded.
    pub memory_limit: Option<usize>,
    /// Source rows a whole rebuild of an incremental stage computes at a time (see `delta::Slices`);
    /// 0: all at once.
    pub slice_rows: u64,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            max_parallel: default_max_parallel(),
            progress: false,
            logical_date: None,
            select: None,
            rebuild: None,
            rebuild_keyed: true,
            lock_timeout: std::time::Duration::ZERO,
            memory_limit: None,
            slice_rows: crate::delta::SLICE_ROWS,
        }
    }
}

/// What every stage task shares.
struct RunContext {
    pipeline: Pipeline,
    options: RunOptions,
    state: StateStore,
    run_id: String,
    progress: progress::Progress,
}

/// Runs the pipeline once: every stage whose inputs changed, in dependency order.
pub async fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<RunReport, RunError> {
    let run_id = uuid::Uuid::new_v4().to_string();
    let span = info_span!("pipeline", pipeline = %pipeline.name, run_id = %run_id);
    async {
        let started = state::now_micros();
        let clock = Instant::now();
        crate::engine::tune_allocator(options.memory_limit.is_some());
        info!(lake = %pipeline.lake, stages = pipeline.stages.len(), "run started");
        // Before anything is written: the lake is reachable and its commits are safe with concurrent
        // writers (see `storage::preflight`).
        crate::storage::preflight(&pipeline.lake).await?;
        let lock = lock::acquire(&pipeline.lake, &pipeline.name, options.lock_timeout).await?;
        // Whatever happens inside, the lock is released before returning.
        let result = run_locked(pipeline, options, &run_id, started, clock).await;
        lock.release().await;
        result
    }
    .instrument(span)
    .await
}

/// The run itself, while it holds the pipeline's run lock.
async fn run_locked(
    pipeline: &Pipeline,
    options: &RunOptions,
    run_id: &str,
    started: i64,
    clock: Instant,
) -> Result<RunReport, RunError> {
    let run_id = run_id.to_string();
    let context = Arc::new(RunContext {
        options: options.clone(),
        pipeline: pipeline.clone(),
        state: StateStore::new(&pipeline.lake),
        run_id: run_id.clone(),
        progress: progress::Progress::new(options.progress),
    });
    let mut reports: Vec<Option<StageReport>> = vec![None; pipeline.stages.len()];
    let mut queue = ReadyQueue::new(&pipeline.graph);
    let mut blocked: BTreeSet<usize> = BTreeSet::new();
    let mut running = JoinSet::new();
    loop {
        while running.len() < options.max_parallel.max(1) {
            let Some(index) = queue.pop() else { break };
            let selected = options
                .select
                .as_ref()
                .is_none_or(|s| s.contains(&pipeline.stages[index].name));
            if !selected {
                queue.complete(index);
                continue;
            }
            if blocked.contains(&index) {
                let failed_upstream = pipeline
                    .graph
                    .all_upstream(index)
                    .into_iter()
                    .find(|u| {
                        reports[*u]
                            .as_ref()
                            .is_some_and(|r| matches!(r.outcome, StageOutcome::Failed(_)))
                    })
                    .map(|u| pipeline.stages[u].name.clone())
                    .unwrap_or_default();
                reports[index] = Some(StageReport::skipped(
                    &pipeline.stages[index],
                    failed_upstream,
                ));
                queue.complete(index);
                continue;
            }
            let context = context.clone();
            running.spawn(async move { (index, stage::run(&context, index).await) });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (index, report) = joined.map_err(|e| RunError::Internal {
            stage: "-".into(),
            message: format!("stage task panicked or was cancelled: {e}"),
        })?;
        if let StageOutcome::Failed(message) = &report.outcome {
            error!(stage = %report.stage, "{message}");
            blocked.extend(pipeline.graph.all_downstream(index));
        }
        reports[index] = Some(report);
        queue.complete(index);
    }
    let stages: Vec<StageReport> = reports.into_iter().flatten().collect();
    let mut report = RunReport {
        run_id: run_id.clone(),
        pipeline: pipeline.name.clone(),
        stages,
        elapsed: clock.elapsed(),
        started_micros: started,
        notifications: Vec::new(),
        maintained: Vec::new(),
    };
    // Tables that crossed the small-file threshold are compacted now, so daily runs do not pile up
    // files (compaction commits change no data, so readers and incremental stages are unaffected).
    let threshold = pipeline.maintenance.optimize_after_files;
    let mut written: Vec<crate::config::TableName> = report
        .stages
        .iter()
        .filter(|s| s.output_version.is_some())
        .filter_map(|s| crate::config::TableName::parse(&s.target))
        .collect();
    match crate::lake::tables(&pipeline.lake).await {
        Ok(all) => written.extend(all.into_iter().filter(|t| t.schema == "_medallion")),
        Err(error) => warn!("could not list the state tables to compact: {error}"),
    }
    for table in written {
        match crate::maintain::optimize_if_needed(pipeline, &table, threshold).await {
            Ok(Some(done)) => {
                info!(table = %table, files = done.files_before, compacted = done.files_compacted, "compacted small files");
                report.maintained.push(done);
            }
            Ok(None) => {}
            Err(error) => warn!("could not compact `{table}`: {error}"),
        }
    }
    if !pipeline.notify.is_empty() {
        let event = if report.stages_succeeded() {
            notify::Event::Success
        } else {
            notify::Event::Failure
        };
        report.notifications = notify::send_all(
            &pipeline.notify,
            event,
            &pipeline.name,
            report.status(),
            &report.to_json(),
        )
        .await;
    }
    let meta = CommitMeta {
        run_id: run_id.clone(),
        stage: "_run".into(),
    };
    let record = RunRecord {
        run_id: run_id.clone(),
        pipeline: pipeline.name.clone(),
        status: report.status().to_string(),
        started_micros: started,
        finished_micros: state::now_micros(),
        stages_succeeded: report.count(|o| matches!(o, StageOutcome::Succeeded)),
        stages_up_to_date: report.count(|o| matches!(o, StageOutcome::UpToDate(_))),
        stages_failed: report.count(|o| matches!(o, StageOutcome::Failed(_))),
        stages_skipped: report.count(|o| matches!(o, StageOutcome::Skipped(_))),
    };
    crate::crash::point("before_run_history");
    context.state.record_run(&record, &meta).await?;
    if let Err(error) = context
        .state
        .record_notifications(&run_id, &report.notifications, &meta)
        .await
    {
        warn!("could not record the notifications: {error}");
    }
    info!(
        status = report.status(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "run finished"
    );
    Ok(report)
}
