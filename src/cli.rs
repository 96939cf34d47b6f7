//! The command line: clap definitions, and the only place that writes to stdout. Each command turns its
//! arguments into validated options, calls the library, and prints the result.

use std::{io::IsTerminal, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config,
    error::{Error, Result, exit_code},
    generate::{self, FileStyle, GenerateOptions},
    runner::{self, RunOptions, plan},
    storage::Location,
};

#[derive(Debug, Parser)]
#[command(
    name = "medallion",
    version,
    about = "Bronze → Silver → Gold Delta Lake pipelines from one YAML file",
    long_about = "Batch medallion ETL: land AWS DMS change files in Bronze, apply them to Silver with \
                  incremental merges, build Gold facts and KPIs, all as Delta tables.\n\n\
                  Exit codes: 0 success, 1 a stage failed, 2 invalid pipeline or arguments, 3 other error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More logging (-v: debug, -vv: trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: ingest new landing files, apply them to Silver, rebuild Gold.
    Run(RunArgs),
    /// Check a pipeline file (YAML keys, SQL files, table references, cycles) without touching data.
    Validate {
        /// Pipeline YAML file.
        file: PathBuf,
    },
    /// Print the stage DAG and what each stage reads and writes.
    Plan {
        /// Pipeline YAML file.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Run a date range, one idempotent unit per logical date; re-running resumes where it stopped.
    Backfill(BackfillArgs),
    /// Show the pipeline's recent runs, with the checks that did not pass.
    History {
        /// Pipeline YAML file.
        file: PathBuf,
        /// How many runs, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Query the lake's tables with SQL (`SELECT ... FROM gold.daily_kpis`), with time travel.
    Sql {
        /// One SELECT; tables by `layer.name`.
        query: String,
        #[command(flatten)]
        lake: LakeArgs,
        #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
        format: SqlFormat,
        /// Read the tables the query names at this Delta version.
        #[arg(long, conflicts_with = "as_of")]
        version: Option<u64>,
        /// Read the tables the query names as of this RFC 3339 time (e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        as_of: Option<String>,
    },
    /// Show a table: schema with comments, partitioning, files and size, commits with their runs.
    Describe {
        /// Table as `layer.name`, e.g. `gold.daily_kpis`.
        table: String,
        #[command(flatten)]
        lake: LakeArgs,
        /// How many commits of history to show.
        #[arg(long, default_value_t = 20)]
        history: usize,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Compact small files, vacuum unreferenced ones and write checkpoints for the pipeline's tables.
    Maintain {
        /// Pipeline YAML file.
        file: PathBuf,
        /// Compact small files (Z-order by a stage's `zorder_by`; an unpartitioned table incremental
        /// by a column only in files under 4 MiB, which keeps its ranges' files apart).
        #[arg(long)]
        optimize: bool,
        /// Delete the files no version within the retention reads (replaced data files, superseded
        /// deletion vectors, leftovers of interrupted writes), once older than the retention, and the
        /// log entries none of those versions needs (kept as long as `delta.logRetentionDuration`).
        #[arg(long)]
        vacuum: bool,
        /// Write a checkpoint of each table's log.
        #[arg(long)]
        checkpoint: bool,
        /// Vacuum retention in days (default `maintenance.vacuum_retention_days`); never below the
        /// time-travel and backfill windows the pipeline promises.
        #[arg(long)]
        retention_days: Option<u32>,
        /// Show what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for a run of the pipeline to finish before giving up (exit code 4).
        #[arg(long, default_value_t = 0)]
        lock_timeout: u64,
    },
    /// Send a sample notification to each `notify:` target of the pipeline, to check the setup.
    NotifyTest {
        /// Pipeline YAML file.
        file: PathBuf,
    },
    /// Generate the reference workload (financial transactions as AWS DMS lands them).
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline YAML file.
    pub file: PathBuf,
    /// Stages that may run at the same time (default: half the cores, at least 1; each stage's
    /// queries use every core).
    #[arg(long, default_value_t = crate::runner::default_max_parallel())]
    pub max_parallel: usize,
    /// Format of the run report on stdout (JSON also with `--log-format json`).
    #[arg(long, value_enum)]
    pub output: Option<OutputFormat>,
    /// Logical date (like Airflow's `{{ ds }}`): ingest the landing files dated on or before it; SQL sees
    /// `$logical_date`, `$start` (the date) and `$end` (the next day).
    #[arg(long, value_parser = parse_date)]
    pub date: Option<chrono::NaiveDate>,
    /// Variables for SQL (`{{ name }}` or `$name`), overriding the pipeline's `vars:`. Repeatable.
    #[arg(long = "vars", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// Run only these stages: `name`, `name+` (with everything downstream), `+name` (with everything
    /// upstream). Comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub select: Vec<String>,
    /// Seconds to wait for another run of the same pipeline to finish before giving up (exit code 4).
    #[arg(long, default_value_t = 0)]
    pub lock_timeout: u64,
    /// Memory for query execution per stage (`512M`, `4G`): sorts, joins and aggregations spill to disk
    /// past it, and a stage that cannot fit fails with a clear error instead of being killed.
    #[arg(long, env = "MEDALLION_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub memory_limit: Option<usize>,
    /// Source rows an incremental stage that aggregates, joins or sorts computes at a time when it
    /// rebuilds its whole table: one range of its `incremental.column` after another, which bounds its
    /// memory (0: all at once).
    #[arg(long, env = "MEDALLION_SLICE_ROWS", default_value_t = crate::delta::SLICE_ROWS)]
    pub slice_rows: u64,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// Pipeline YAML file.
    pub file: PathBuf,
    /// First logical date (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub from: chrono::NaiveDate,
    /// Last logical date, included.
    #[arg(long, value_parser = parse_date)]
    pub to: chrono::NaiveDate,
    /// Redo dates that already succeeded with the same inputs and code.
    #[arg(long)]
    pub force: bool,
    /// List the dates that would run and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// `all`: ingest and run everything per date; `gold`: recompute the range's Gold rows from Silver.
    #[arg(long, value_enum, default_value_t = StagesArg::All)]
    pub stages: StagesArg,
    #[arg(long = "vars", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// Stages that may run at the same time within a date (default: half the cores, at least 1).
    #[arg(long, default_value_t = crate::runner::default_max_parallel())]
    pub max_parallel: usize,
    /// Seconds to wait for another run of the same pipeline (exit code 4 after).
    #[arg(long, default_value_t = 0)]
    pub lock_timeout: u64,
    /// Memory for query execution per stage, as for `run`.
    #[arg(long, env = "MEDALLION_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub memory_limit: Option<usize>,
    /// Source rows computed at a time by a whole rebuild of an incremental stage, as for `run`.
    #[arg(long, env = "MEDALLION_SLICE_ROWS", default_value_t = crate::delta::SLICE_ROWS)]
    pub slice_rows: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StagesArg {
    All,
    Gold,
}

/// `512M`, `4G`, `1.5G`, `1048576`: a size in bytes (K, M, G, T are powers of 1024).
fn parse_bytes(text: &str) -> std::result::Result<usize, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale: f64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit `{other}`: use K, M, G or T")),
    };
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 512M or 4G"))?;
    let bytes = number * scale;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(format!("`{text}` must be at least one byte"));
    }
    Ok(bytes as usize)
}

fn parse_date(text: &str) -> std::result::Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("`{text}` is not a date like 2019-10-31"))
}

fn parse_var(text: &str) -> std::result::Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{text}` is not `name=value`"))
}

/// Resolves `--select` items against the pipeline's DAG.
fn resolve_select(
    pipeline: &crate::config::Pipeline,
    items: &[String],
) -> Result<Option<std::collections::BTreeSet<String>>> {
    if items.is_empty() {
        return Ok(None);
    }
    let mut chosen = std::collections::BTreeSet::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let upstream = item.starts_with('+');
        let downstream = item.ends_with('+');
        let name = item.trim_matches('+');
        let index = pipeline
            .stages
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "`--select {item}`: no stage `{name}`; stages: {}",
                    pipeline
                        .stages
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        chosen.insert(index);
        if upstream {
            chosen.extend(pipeline.graph.all_upstream(index));
        }
        if downstream {
            chosen.extend(pipeline.graph.all_downstream(index));
        }
    }
    Ok(Some(
        chosen
            .into_iter()
            .map(|i| pipeline.stages[i].name.clone())
            .collect(),
    ))
}

/// Where the lake is: `--lake`, else the `lake:` of `--pipeline`, else `./lake`.
#[derive(Debug, Args)]
pub struct LakeArgs {
    /// Pipeline whose lake to read.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Lake root: a folder or `s3://bucket/prefix` (credentials and endpoint from the AWS environment).
    #[arg(long, conflicts_with = "pipeline")]
    pub lake: Option<String>,
}

impl LakeArgs {
    fn resolve(&self) -> Result<Location> {
        let parse = |text: &str| {
            Location::parse(text, std::path::Path::new("."), Default::default())
                .map_err(|e| crate::Error::Usage(e.to_string()))
        };
        match (&self.lake, &self.pipeline) {
            (Some(lake), _) => parse(lake),
            (None, Some(file)) => Ok(config::load(file)?.lake),
            (None, None) => parse("lake"),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SqlFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Text,
    Mermaid,
    Dot,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Output folder; files go under `<out>/public/<table>/` as DMS writes them.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of transactions (inserts over the whole period).
    #[arg(long, default_value_t = 100_000)]
    pub transactions: u64,
    /// Days of transactions, ending 2019-10-31.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// How many of the last days arrive as change files (one per day) instead of in the full load.
    #[arg(long, default_value_t = 5)]
    pub change_days: u32,
    /// Random seed: the same seed gives the same files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write no header row (DMS without AddColumnName).
    #[arg(long)]
    pub no_header: bool,
    /// Write Parquet instead of CSV.
    #[arg(long, conflicts_with = "gzip")]
    pub parquet: bool,
    /// Gzip the CSV files.
    #[arg(long)]
    pub gzip: bool,
    /// Put change files in `YYYY/MM/DD/` folders (DMS DatePartitionEnabled).
    #[arg(long)]
    pub date_folders: bool,
    /// Add the `$AR_H_CHANGE_SEQ` column.
    #[arg(long)]
    pub change_seq: bool,
    /// Rows per full-load file.
    #[arg(long, default_value_t = 500_000)]
    pub rows_per_load_file: u64,
    /// Also write one extra change file of this many changes (half updates of keys over all dates, 1%
    /// deletes, the rest inserts) under `<out>/batch/public/transactions/`, apart from the landing
    /// files: move it in to deliver it (the benchmarks' incremental run).
    #[arg(long, default_value_t = 0)]
    pub change_batch: u64,
    /// The change batch's updates and deletes hit keys of its last this many days (default: all days);
    /// new rows are dated the last day either way.
    #[arg(long, default_value_t = 0, requires = "change_batch")]
    pub change_batch_days: u32,
}

pub fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // On a terminal the progress display and the summary tell the story; logs there are warnings only.
    let interactive = matches!(cli.log_format, LogFormat::Text) && std::io::stderr().is_terminal();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if interactive => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,medallion={level}{}",
            match cli.verbose {
                // A lost commit race is logged there as an error although it is retried (or reported
                // by medallion itself when it is not).
                0 => ",deltalake_core=error,deltalake_core::kernel::transaction=off",
                1 => "",
                _ => ",datafusion=debug,deltalake_core=debug",
            }
        ))
    });
    // These targets print object stores and storage options with `{:?}` at debug level, credentials
    // included; capped whatever RUST_LOG says so that secrets never reach a log.
    let filter = [
        "deltalake_aws=info",
        "deltalake_aws::storage=info",
        "deltalake_aws::credentials=info",
        "deltalake_aws::logstore=info",
        "deltalake_core::logstore=info",
        "deltalake_core::logstore::config=info",
        "deltalake_core::logstore::factories=info",
    ]
    .into_iter()
    .filter_map(|d| d.parse().ok())
    .fold(filter, |f, d| f.add_directive(d));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Runs the command; returns the exit code for outcomes that are not errors of medallion itself.
pub fn run(cli: Cli) -> Result<u8> {
    let progress = !cli.quiet
        && cli.verbose == 0
        && matches!(cli.log_format, LogFormat::Text)
        && std::io::stderr().is_terminal();
    match cli.command {
        Command::Validate { file } => {
            let pipeline = config::load(&file)?;
            println!(
                "pipeline `{}` is valid: {} source(s), {} stage(s)",
                pipeline.name,
                pipeline.sources.len(),
                pipeline.stages.len()
            );
            Ok(exit_code::SUCCESS)
        }
        Command::Plan { file, format } => {
            let pipeline = config::load(&file)?;
            let text = match format {
                PlanFormat::Text => plan::text(&pipeline),
                PlanFormat::Mermaid => plan::mermaid(&pipeline),
                PlanFormat::Dot => plan::dot(&pipeline),
            };
            print!("{text}");
            Ok(exit_code::SUCCESS)
        }
        Command::Run(args) => {
            if args.max_parallel == 0 {
                return Err(Error::Usage("`--max-parallel` must be at least 1".into()));
            }
            let mut vars: std::collections::BTreeMap<String, String> =
                args.vars.iter().cloned().collect();
            if let Some(date) = args.date {
                for (k, v) in runner::backfill::date_vars(date, &Default::default()) {
                    vars.entry(k).or_insert(v);
                }
            }
            let pipeline = config::load_with_vars(&args.file, &vars)?;
            let options = RunOptions {
                max_parallel: args.max_parallel,
                progress,
                logical_date: args.date,
                select: resolve_select(&pipeline, &args.select)?,
                rebuild: None,
                rebuild_keyed: true,
                lock_timeout: std::time::Duration::from_secs(args.lock_timeout),
                memory_limit: args.memory_limit,
                slice_rows: args.slice_rows,
            };
            let report = runtime()?.block_on(runner::run(&pipeline, &options))?;
            let json = match args.output {
                Some(format) => format == OutputFormat::Json,
                None => matches!(cli.log_format, LogFormat::Json),
            };
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render());
            }
            Ok(if report.succeeded() {
                exit_code::SUCCESS
            } else {
                exit_code::RUN_FAILED
            })
        }
        Command::Backfill(args) => {
            let options = runner::backfill::BackfillOptions {
                from: args.from,
                to: args.to,
                scope: match args.stages {
                    StagesArg::All => runner::backfill::Scope::All,
                    StagesArg::Gold => runner::backfill::Scope::Gold,
                },
                force: args.force,
                dry_run: args.dry_run,
                vars: args.vars.iter().cloned().collect(),
                run: RunOptions {
                    max_parallel: args.max_parallel.max(1),
                    progress,
                    lock_timeout: std::time::Duration::from_secs(args.lock_timeout),
                    memory_limit: args.memory_limit,
                    slice_rows: args.slice_rows,
                    ..RunOptions::default()
                },
            };
            let report = runtime()?.block_on(runner::backfill::backfill(&args.file, &options))?;
            print!("{}", report.render(args.dry_run));
            Ok(if report.succeeded() {
                exit_code::SUCCESS
            } else {
                exit_code::RUN_FAILED
            })
        }
        Command::History {
            file,
            limit,
            format,
        } => {
            let pipeline = config::load(&file)?;
            let entries = runtime()?
                .block_on(runner::history::recent(&pipeline, limit))
                .map_err(runner::RunError::from)?;
            match format {
                OutputFormat::Text => print!("{}", runner::history::render(&entries)),
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&runner::history::to_json(&entries))
                        .unwrap_or_default()
                ),
            }
            Ok(exit_code::SUCCESS)
        }
        Command::Sql {
            query,
            lake,
            format,
            version,
            as_of,
        } => {
            let lake = lake.resolve()?;
            let as_of = match (version, as_of) {
                (Some(v), _) => crate::lake::AsOf::Version(v),
                (None, Some(ts)) => crate::lake::AsOf::Timestamp(ts),
                (None, None) => crate::lake::AsOf::Latest,
            };
            let batches = runtime()?.block_on(crate::lake::query(&lake, &query, &as_of))?;
            let format = match format {
                SqlFormat::Table => crate::lake::Format::Table,
                SqlFormat::Csv => crate::lake::Format::Csv,
                SqlFormat::Json => crate::lake::Format::Json,
            };
            print!("{}", crate::lake::format(&batches, format)?);
            Ok(exit_code::SUCCESS)
        }
        Command::Describe {
            table,
            lake,
            history,
            format,
        } => {
            let lake = lake.resolve()?;
            let description = runtime()?.block_on(crate::lake::describe(&lake, &table, history))?;
            match format {
                OutputFormat::Text => print!("{}", description.render()),
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&description).unwrap_or_default()
                ),
            }
            Ok(exit_code::SUCCESS)
        }
        Command::Maintain {
            file,
            optimize,
            vacuum,
            checkpoint,
            retention_days,
            dry_run,
            lock_timeout,
        } => {
            let pipeline = config::load(&file)?;
            let none = !optimize && !vacuum && !checkpoint;
            let options = crate::maintain::MaintainOptions {
                optimize: optimize || none,
                vacuum: vacuum || none,
                checkpoint: checkpoint || none,
                dry_run,
                retention_days,
                lock_timeout: std::time::Duration::from_secs(lock_timeout),
            };
            let done = runtime()?.block_on(crate::maintain::maintain(&pipeline, &options))?;
            print!("{}", crate::maintain::render(&done, dry_run));
            Ok(exit_code::SUCCESS)
        }
        Command::NotifyTest { file } => {
            let pipeline = config::load(&file)?;
            if pipeline.notify.is_empty() {
                return Err(Error::Usage(format!(
                    "pipeline `{}` has no `notify:` targets",
                    pipeline.name
                )));
            }
            let sample = serde_json::json!({
                "run_id": "notify-test",
                "pipeline": pipeline.name,
                "status": "test",
                "message": "a test notification from `medallion notify-test`",
                "stages": [],
            });
            let deliveries = runtime()?.block_on(crate::notify::send_all(
                &pipeline.notify,
                crate::notify::Event::Test,
                &pipeline.name,
                "test",
                &sample,
            ));
            let mut all = true;
            for d in &deliveries {
                all &= d.delivered;
                match &d.error {
                    None => println!(
                        "{} ({}): delivered after {} attempt(s)",
                        d.target, d.kind, d.attempts
                    ),
                    Some(error) => println!("{} ({}): NOT delivered: {error}", d.target, d.kind),
                }
            }
            Ok(if all {
                exit_code::SUCCESS
            } else {
                exit_code::RUN_FAILED
            })
        }
        Command::Generate(args) => {
            let options = GenerateOptions {
                out: args.out,
                transactions: args.transactions,
                days: args.days,
                change_days: args.change_days,
                seed: args.seed,
                style: FileStyle {
                    header: !args.no_header,
                    parquet: args.parquet,
                    gzip: args.gzip,
                },
                date_folders: args.date_folders,
                change_seq: args.change_seq,
                rows_per_load_file: args.rows_per_load_file.max(1),
                change_batch: args.change_batch,
                change_batch_days: args.change_batch_days,
            };
            let report = generate::generate(&options)?;
            println!(
                "wrote {} files to `{}`: {} inserts, {} updates, {} deletes; {} cards, {} users",
                report.files,
                options.out.display(),
                report.inserts,
                report.updates,
                report.deletes,
                report.cards,
                report.users
            );
            Ok(exit_code::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // DataFusion plans and optimizes by recursion; a big query wants more than tokio's 2 MiB.
        .thread_stack_size(8 << 20)
        .build()
        .map_err(|e| Error::Usage(format!("cannot start the async runtime: {e}")))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_read_with_binary_units() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("2gib"), Ok(2 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12X").unwrap_err().contains("unknown unit"));
    }
}
