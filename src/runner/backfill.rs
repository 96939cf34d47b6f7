//! `medallion backfill`: a date range run as one idempotent unit per logical date, in date order (each
//! date's changes build on the Silver the earlier dates left). Each unit is recorded in
//! `<lake>/_medallion/backfill_units` with a fingerprint of the code (pipeline file and SQL) and of its
//! inputs (the landing files of that date), so running the same command again skips the dates that
//! already succeeded with the same code and inputs, redoes the ones that failed or were interrupted, and
//! `--force` redoes everything (recomputing the dates' Gold rows). `--stages gold` rebuilds the range's
//! Gold rows from Silver alone, in one atomic replace per table, with checks.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use super::{RunError, RunOptions, RunReport};
use crate::{
    config::{self, Layer, Pipeline, StageInput},
    landing,
    state::{StateStore, UnitRecord},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Ingest the date's files and run every stage.
    All,
    /// Recompute the Gold rows of the dates from Silver.
    Gold,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Gold => "gold",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub scope: Scope,
    pub force: bool,
    pub dry_run: bool,
    pub vars: BTreeMap<String, String>,
    pub run: RunOptions,
}

/// What a date's unit will do, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitPlan {
    pub date: NaiveDate,
    pub run: bool,
    pub reason: String,
    #[serde(skip)]
    code_hash: String,
    #[serde(skip)]
    inputs_hash: String,
}

#[derive(Debug, Clone, Default)]
pub struct BackfillReport {
    pub plans: Vec<UnitPlan>,
    /// (date, run report) of each unit that ran, in order.
    pub runs: Vec<(NaiveDate, RunReport)>,
}

impl BackfillReport {
    pub fn succeeded(&self) -> bool {
        self.runs.iter().all(|(_, r)| r.succeeded())
    }

    pub fn render(&self, dry_run: bool) -> String {
        let mut out = String::new();
        for plan in &self.plans {
            let ran = self.runs.iter().find(|(d, _)| *d == plan.date);
            let status = match (plan.run, ran, dry_run) {
                (false, _, _) => "skip".to_string(),
                (true, _, true) => "would run".to_string(),
                (true, Some((_, report)), false) => format!("ran: {}", report.status()),
                (true, None, false) => "not run (an earlier date failed)".to_string(),
            };
            out.push_str(&format!("{}  {:<40}  {}\n", plan.date, status, plan.reason));
        }
        out
    }
}

fn dates(from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    from.iter_days().take_while(|d| *d <= to).collect()
}

/// The variables a unit's SQL sees: `logical_date`, `start` (the date) and `end` (the next day).
pub fn date_vars(date: NaiveDate, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut vars = extra.clone();
    vars.insert("logical_date".into(), date.to_string());
    vars.insert("start".into(), date.to_string());
    vars.insert("end".into(), date.succ_opt().unwrap_or(date).to_string());
    vars
}

/// SHA-256 over the pipeline file and every SQL file it uses, as written.
fn code_hash(pipeline: &Pipeline) -> String {
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(&pipeline.file).unwrap_or_default());
    for stage in &pipeline.stages {
        if let StageInput::Sql { file, .. } = &stage.input {
            hasher.update(file.to_string_lossy().as_bytes());
            hasher.update(std::fs::read(file).unwrap_or_default());
        }
    }
    hex::encode(hasher.finalize())
}

/// Every source's landing files, listed once for the whole range (`None`: the folder cannot be listed).
async fn landing_files(pipeline: &Pipeline) -> Vec<(String, Option<Vec<landing::LandingFile>>)> {
    let mut all = Vec::new();
    for source in &pipeline.sources {
        all.push((source.name.clone(), landing::discover(source).await.ok()));
    }
    all
}

/// SHA-256 over the names and sizes of the landing files of `date` (and the undated full load).
fn inputs_hash(landing: &[(String, Option<Vec<landing::LandingFile>>)], date: NaiveDate) -> String {
    let mut hasher = Sha256::new();
    for (source, files) in landing {
        let Some(files) = files else {
            hasher.update(format!("{source}: missing"));
            continue;
        };
        for file in files.iter().filter(|f| f.date().is_none_or(|d| d == date)) {
            hasher.update(format!("{source}/{}:{}\n", file.relative, file.size));
        }
    }
    hex::encode(hasher.finalize())
}

/// SHA-256 over the versions of the tables Gold reads (Gold's only inputs when rebuilt from Silver).
async fn gold_inputs_hash(pipeline: &Pipeline) -> String {
    let mut hasher = Sha256::new();
    let reads: BTreeSet<_> = pipeline
        .stages
        .iter()
        .filter(|s| s.layer == Layer::Gold)
        .flat_map(|s| s.reads().to_vec())
        .collect();
    for table in reads {
        let version = crate::delta::version(&pipeline.table_path(&table))
            .await
            .ok()
            .flatten();
        hasher.update(format!("{table}:{version:?}\n"));
    }
    hex::encode(hasher.finalize())
}

pub async fn backfill(
    file: &Path,
    options: &BackfillOptions,
) -> Result<BackfillReport, crate::Error> {
    if options.to < options.from {
        return Err(crate::Error::Usage(format!(
            "`--to {}` is before `--from {}`",
            options.to, options.from
        )));
    }
    let range = dates(options.from, options.to);
    let base = config::load_with_vars(file, &date_vars(options.from, &options.vars))?;
    let state = StateStore::new(&base.lake);
    let code = code_hash(&base);
    let gold_inputs = match options.scope {
        Scope::Gold => Some(gold_inputs_hash(&base).await),
        Scope::All => None,
    };
    let landing = match gold_inputs {
        Some(_) => Vec::new(),
        None => landing_files(&base).await,
    };
    let mut report = BackfillReport::default();
    for date in &range {
        let inputs = gold_inputs
            .clone()
            .unwrap_or_else(|| inputs_hash(&landing, *date));
        let last = state
            .last_unit(&base.name, &date.to_string(), options.scope.name())
            .await
            .map_err(RunError::from)?;
        let (run, reason) = match &last {
            _ if options.force => (true, "forced".to_string()),
            None => (true, "never ran".to_string()),
            Some(unit) if unit.status != "succeeded" => {
                (true, format!("{} in run {}", unit.status, unit.run_id))
            }
            Some(unit) if unit.code_hash != code => (true, "pipeline or SQL changed".to_string()),
            Some(unit) if unit.inputs_hash != inputs => (true, "inputs changed".to_string()),
            Some(unit) => (
                false,
                format!(
                    "succeeded in run {} with the same inputs and code",
                    unit.run_id
                ),
            ),
        };
        report.plans.push(UnitPlan {
            date: *date,
            run,
            reason,
            code_hash: code.clone(),
            inputs_hash: inputs,
        });
    }
    if options.dry_run {
        return Ok(report);
    }
    match options.scope {
        Scope::All => {
            for (unit, plan) in report
                .plans
                .clone()
                .into_iter()
                .filter(|p| p.run)
                .enumerate()
            {
                let pipeline = config::load_with_vars(file, &date_vars(plan.date, &options.vars))?;
                let mut run = options.run.clone();
                run.logical_date = Some(plan.date);
                if options.force {
                    run.rebuild = Some(BTreeSet::from([plan.date.to_string()]));
                    // A stage incremental by key alone is rebuilt in full by the first unit; the
                    // later ones refresh it by key from the changes their dates bring.
                    run.rebuild_keyed = unit == 0;
                }
                let outcome = super::run(&pipeline, &run).await?;
                record(&state, &pipeline, &plan, options.scope, &outcome).await?;
                let failed = !outcome.succeeded();
                report.runs.push((plan.date, outcome));
                if failed {
                    break;
                }
            }
        }
        Scope::Gold => {
            let chosen: Vec<UnitPlan> = report.plans.iter().filter(|p| p.run).cloned().collect();
            if !chosen.is_empty() {
                let mut run = options.run.clone();
                run.select = Some(
                    base.stages
                        .iter()
                        .filter(|s| s.layer == Layer::Gold)
                        .map(|s| s.name.clone())
                        .collect(),
                );
                run.rebuild = Some(chosen.iter().map(|p| p.date.to_string()).collect());
                let outcome = super::run(&base, &run).await?;
                for plan in &chosen {
                    record(&state, &base, plan, options.scope, &outcome).await?;
                }
                for plan in &chosen {
                    report.runs.push((plan.date, outcome.clone()));
                }
            }
        }
    }
    Ok(report)
}

async fn record(
    state: &StateStore,
    pipeline: &Pipeline,
    plan: &UnitPlan,
    scope: Scope,
    outcome: &RunReport,
) -> Result<(), RunError> {
    let unit = UnitRecord {
        pipeline: pipeline.name.clone(),
        date: plan.date.to_string(),
        scope: scope.name().to_string(),
        code_hash: plan.code_hash.clone(),
        inputs_hash: plan.inputs_hash.clone(),
        status: outcome.status().to_string(),
        run_id: outcome.run_id.clone(),
    };
    let meta = crate::delta::CommitMeta {
        run_id: outcome.run_id.clone(),
        stage: "_backfill".into(),
    };
    state
        .record_unit(&unit, &meta)
        .await
        .map_err(RunError::from)
}
