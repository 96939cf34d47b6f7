//! Shared helpers: a scratch project (landing folder + lake), running the binary, reading Delta tables,
//! and an independent replay of the generated DMS files that Silver and Gold are checked against.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Command, Output},
    str::FromStr,
};

use arrow::util::display::{ArrayFormatter, FormatOptions};
use medallion::{
    config::TableName,
    generate::{FileStyle, GenerateOptions, generate},
};
use rust_decimal::Decimal;

pub const BIN: &str = env!("CARGO_BIN_EXE_medallion");

/// The repository root (where `pipelines/` and `sql/` live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch landing folder and lake for one test, removed when dropped.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn landing(&self) -> PathBuf {
        self.dir.path().join("landing")
    }

    pub fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// Generates the reference workload into `landing`.
    pub fn generate(&self, transactions: u64, days: u32, change_days: u32, seed: u64) {
        self.generate_with_batch(transactions, days, change_days, seed, 0);
    }

    /// Like [`Scratch::generate`], plus one change file of `batch` changes kept under
    /// `landing/batch/` until [`Scratch::deliver_batch`] moves it in.
    pub fn generate_with_batch(
        &self,
        transactions: u64,
        days: u32,
        change_days: u32,
        seed: u64,
        batch: u64,
    ) {
        self.generate_with_recent_batch(transactions, days, change_days, seed, batch, 0);
    }

    /// Like [`Scratch::generate_with_batch`], the batch's updates and deletes hitting keys of its
    /// last `batch_days` days (0: all days).
    pub fn generate_with_recent_batch(
        &self,
        transactions: u64,
        days: u32,
        change_days: u32,
        seed: u64,
        batch: u64,
        batch_days: u32,
    ) {
        generate(&GenerateOptions {
            out: self.landing(),
            transactions,
            days,
            change_days,
            seed,
            style: FileStyle {
                header: true,
                parquet: false,
                gzip: false,
            },
            date_folders: false,
            change_seq: false,
            rows_per_load_file: 5_000,
            change_batch: batch,
            change_batch_days: batch_days,
        })
        .expect("generate");
    }

    /// Moves the change batch of [`Scratch::generate_with_batch`] into the landing folder.
    pub fn deliver_batch(&self) {
        let held = self.landing().join("batch/public/transactions");
        for entry in std::fs::read_dir(&held).expect("batch folder") {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("file name").to_owned();
            std::fs::rename(&path, self.transactions_dir().join(name)).expect("deliver batch");
        }
    }

    pub fn transactions_dir(&self) -> PathBuf {
        self.landing().join("public").join("transactions")
    }

    /// Moves every change file of transactions aside, leaving the full load; returns as
    /// [`Scratch::hold_back_changes`] does.
    pub fn hold_back_all_changes(&self) -> Vec<(PathBuf, PathBuf)> {
        let changes = std::fs::read_dir(self.transactions_dir())
            .expect("read landing")
            .filter(|e| !file_name(&e.as_ref().expect("entry").path()).starts_with("LOAD"))
            .count();
        self.hold_back_changes(changes)
    }

    /// Moves the last `n` change files of transactions aside; returns (held, their original paths).
    pub fn hold_back_changes(&self, n: usize) -> Vec<(PathBuf, PathBuf)> {
        let held = self.dir.path().join("held");
        std::fs::create_dir_all(&held).expect("held dir");
        let mut changes: Vec<PathBuf> = std::fs::read_dir(self.transactions_dir())
            .expect("read landing")
            .map(|e| e.expect("entry").path())
            .filter(|p| !file_name(p).starts_with("LOAD"))
            .collect();
        changes.sort();
        changes
            .split_off(changes.len() - n)
            .into_iter()
            .map(|path| {
                let aside = held.join(file_name(&path));
                std::fs::rename(&path, &aside).expect("move aside");
                (aside, path)
            })
            .collect()
    }

    /// Runs `medallion run pipelines/transactions.yaml` against this scratch landing and lake.
    pub fn run(&self) -> Output {
        self.command(&["run", "pipelines/transactions.yaml"])
    }

    pub fn command(&self, args: &[&str]) -> Output {
        self.command_logging(args, "warn")
    }

    /// As [`Scratch::command`], logging what `rust_log` says (`medallion=debug`: each stage's steps).
    pub fn command_logging(&self, args: &[&str], rust_log: &str) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(repo())
            .env("MEDALLION_LANDING", self.landing())
            .env("MEDALLION_LAKE", self.lake())
            .env("RUST_LOG", rust_log)
            .output()
            .expect("run medallion")
    }

    /// Runs `medallion run` on a copy of the reference project whose YAML is rewritten by `edit_yaml` and
    /// one SQL file (path under `sql/`) by `edit_sql`, rewritten on every call.
    pub fn run_edited(
        &self,
        edit_yaml: &dyn Fn(String) -> String,
        edit_sql: Option<(&str, &dyn Fn(String) -> String)>,
    ) -> Output {
        let project = self.edit_project(edit_yaml, edit_sql);
        self.command_in(&project, &["run", "pipelines/t.yaml"])
    }

    /// Writes the project [`Scratch::run_edited`] runs (`pipelines/t.yaml`); returns its folder.
    pub fn edit_project(
        &self,
        edit_yaml: &dyn Fn(String) -> String,
        edit_sql: Option<(&str, &dyn Fn(String) -> String)>,
    ) -> PathBuf {
        let project = self.dir.path().join("project");
        let _ = std::fs::remove_dir_all(&project);
        std::fs::create_dir_all(project.join("pipelines")).expect("project");
        copy_dir(&repo().join("sql"), &project.join("sql"));
        let yaml =
            std::fs::read_to_string(repo().join("pipelines/transactions.yaml")).expect("yaml");
        std::fs::write(project.join("pipelines/t.yaml"), edit_yaml(yaml)).expect("write yaml");
        if let Some((file, edit)) = edit_sql {
            let path = project.join("sql").join(file);
            let text = std::fs::read_to_string(&path).expect("sql file");
            std::fs::write(&path, edit(text)).expect("write sql");
        }
        project
    }

    /// Runs medallion with `args` from `dir` against this scratch landing and lake. Stages here keep no
    /// intermediate result in memory (`MEDALLION_SCRATCH_MEMORY=0`), so that the tests running edited
    /// projects cover the on-disk path and those running the reference one the in-memory path.
    pub fn command_in(&self, dir: &Path, args: &[&str]) -> Output {
        self.command_in_logging(dir, args, "warn")
    }

    /// As [`Scratch::command_in`], logging what `rust_log` says.
    pub fn command_in_logging(&self, dir: &Path, args: &[&str], rust_log: &str) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env("MEDALLION_LANDING", self.landing())
            .env("MEDALLION_LAKE", self.lake())
            .env("MEDALLION_SCRATCH_MEMORY", "0")
            .env("RUST_LOG", rust_log)
            .output()
            .expect("run medallion")
    }

    /// `medallion history --format json` of the project [`Scratch::run_edited`] ran: its runs, latest
    /// first.
    pub fn edited_history(&self) -> serde_json::Value {
        let project = self.dir.path().join("project");
        let history = self.command_in(
            &project,
            &["history", "pipelines/t.yaml", "--format", "json"],
        );
        assert_success(&history);
        serde_json::from_slice(&history.stdout).expect("history json")
    }

    /// Latest Delta version of each table (`layer/name`), `None` where there is no table.
    pub fn versions(&self, tables: &[&str]) -> Vec<Option<u64>> {
        tables
            .iter()
            .map(|t| delta_version(&self.lake().join(t)))
            .collect()
    }

    pub fn table(&self, layer: &str, name: &str) -> PathBuf {
        self.lake().join(layer).join(name)
    }
}

/// A YAML edit for [`Scratch::run_edited`]: the reference transactions source with `on_bad_file: policy`.
pub fn on_bad_file(policy: &str) -> impl Fn(String) -> String + '_ {
    move |yaml: String| {
        yaml.replacen(
            "    dms:\n      timestamp_column: dms_commit_ts\n",
            &format!(
                "    on_bad_file: {policy}\n    dms:\n      timestamp_column: dms_commit_ts\n"
            ),
            1,
        )
    }
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Asserts the command succeeded, showing its output if not.
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "medallion failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Latest commit version of the Delta table at `path` (from its log folder, independently of medallion).
pub fn delta_version(path: &Path) -> Option<u64> {
    std::fs::read_dir(path.join("_delta_log"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json")?.parse::<u64>().ok()
        })
        .max()
}

/// Runs `sql` over the lake's tables (`layer.name`), returning every value formatted as text.
pub async fn query(
    lake: impl Into<medallion::storage::Location>,
    tables: &[&str],
    sql: &str,
) -> Vec<Vec<String>> {
    let lake = lake.into();
    let ctx = medallion::delta::session(None).expect("session");
    for name in tables {
        let table = TableName::parse(name).expect("table name");
        let path = table.path_in(&lake);
        let delta = medallion::delta::open(&path)
            .await
            .expect("open")
            .unwrap_or_else(|| panic!("no Delta table at {path}"));
        let provider = medallion::delta::provider(&path, &delta)
            .await
            .expect("provider");
        medallion::engine::register_table(&ctx, &table, provider, None).expect("register");
    }
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect(),
            );
        }
    }
    rows
}

/// Arrow schema of a Delta table as `name: type` lines.
pub async fn schema(path: &Path) -> Vec<String> {
    let path = medallion::storage::Location::local(path);
    let table = medallion::delta::open(&path)
        .await
        .expect("open")
        .unwrap_or_else(|| panic!("no Delta table at {path}"));
    let provider = medallion::delta::provider(&path, &table)
        .await
        .expect("provider");
    provider
        .schema()
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect()
}

/// A Gold SQL bug for tests: refunds dropped from everything that reads Silver transactions.
pub fn drop_refunds(sql: String) -> String {
    sql.replace(
        "FROM silver.transactions",
        "FROM silver.transactions WHERE amount >= 0",
    )
}

/// Restores the Delta table at `table` to `version` with Python `deltalake`, as another tool would.
pub fn restore_with_python(table: &Path, version: u64) {
    run_python(&format!(
        "from deltalake import DeltaTable\nDeltaTable({:?}).restore({version})\n",
        table.display().to_string()
    ));
}

/// Runs `script` with the [`python`] that has `deltalake`; asserts it succeeds, returns its output.
/// The interpreter leaves without its teardown, in which `deltalake`'s runtime now and then aborts
/// ("terminate called without an active exception").
pub fn run_python(script: &str) -> String {
    run_python_with(script, &[])
}

/// As [`run_python`], with `args` as the script's `sys.argv[1:]`.
pub fn run_python_with(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let script = format!("{script}\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n");
    let output = Command::new(python())
        .args(["-c", &script])
        .args(args)
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

/// The interpreter with `deltalake` installed: `MEDALLION_PYTHON`, else the one `.ci/setup-python.sh`
/// prepares (it installs on first use).
pub fn python() -> String {
    if let Ok(python) = std::env::var("MEDALLION_PYTHON") {
        return python;
    }
    let output = Command::new("bash")
        .arg(repo().join(".ci/setup-python.sh"))
        .output()
        .expect("run .ci/setup-python.sh");
    assert!(
        output.status.success(),
        ".ci/setup-python.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A live transaction after replaying the DMS files by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub date: String,
    pub amount: Decimal,
    pub channel_online: bool,
    pub has_errors: bool,
}

/// Replays every transaction file under `dir` as MISSION.md specifies (last change per key by commit
/// timestamp, then file order with full load first, then row; deletes remove the key), without medallion.
pub fn replay(dir: &Path) -> BTreeMap<i64, Live> {
    let mut files: Vec<PathBuf> = Vec::new();
    collect(dir, &mut files);
    files.sort_by_key(|p| (!file_name(p).starts_with("LOAD"), file_name(p)));
    // key -> (commit ts, file index, row, change)
    let mut last: HashMap<i64, (String, usize, usize, Option<Live>)> = HashMap::new();
    for (index, path) in files.iter().enumerate() {
        let mut reader = csv::Reader::from_path(path).expect("csv");
        let header: Vec<String> = reader
            .headers()
            .expect("header")
            .iter()
            .map(String::from)
            .collect();
        let at = |name: &str| header.iter().position(|h| h == name).expect(name);
        let (op, ts, id, date, amount, chip, errors) = (
            header.iter().position(|h| h == "Op"),
            at("dms_commit_ts"),
            at("id"),
            at("date"),
            at("amount"),
            at("use_chip"),
            at("errors"),
        );
        for (row, record) in reader.records().enumerate() {
            let record = record.expect("record");
            let key: i64 = record[id].parse().expect("id");
            let change = if op.is_some_and(|op| &record[op] == "D") {
                None
            } else {
                Some(Live {
                    date: record[date][..10].to_string(),
                    amount: money(&record[amount]),
                    channel_online: &record[chip] == "Online Transaction",
                    has_errors: !record[errors].is_empty(),
                })
            };
            let order = (record[ts].to_string(), index, row);
            let newer = last
                .get(&key)
                .is_none_or(|(t, f, r, _)| (t.clone(), *f, *r) < order);
            if newer {
                last.insert(key, (order.0, order.1, order.2, change));
            }
        }
    }
    last.into_iter()
        .filter_map(|(key, (_, _, _, change))| change.map(|c| (key, c)))
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "csv") {
            files.push(path);
        }
    }
}

/// `$-77.00` → -77.00
pub fn money(text: &str) -> Decimal {
    Decimal::from_str(&text.replacen('$', "", 1)).unwrap_or_else(|_| panic!("money `{text}`"))
}

/// Per date: (count, sum of amount, refunds, online, errors) from a replay.
pub fn daily(live: &BTreeMap<i64, Live>) -> BTreeMap<String, (u64, Decimal, u64, u64, u64)> {
    let mut days: BTreeMap<String, (u64, Decimal, u64, u64, u64)> = BTreeMap::new();
    for txn in live.values() {
        let day = days.entry(txn.date.clone()).or_default();
        day.0 += 1;
        day.1 += txn.amount;
        day.2 += u64::from(txn.amount.is_sign_negative() && !txn.amount.is_zero());
        day.3 += u64::from(txn.channel_online);
        day.4 += u64::from(txn.has_errors);
    }
    days
}

/// Every file under `dir`, its `_delta_log` left out.
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.ends_with("_delta_log") {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The table property that keeps a table's codec (`None` when it names none), from its first commit,
/// and the codecs of its data files' columns, each once.
pub fn codecs(table: &std::path::Path) -> (Option<String>, std::collections::BTreeSet<String>) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000000.json")).unwrap();
    let property = log.lines().find_map(|line| {
        let action: serde_json::Value = serde_json::from_str(line).unwrap();
        action["metaData"]["configuration"]["medallion.parquet.compression"]
            .as_str()
            .map(str::to_string)
    });
    let mut found = std::collections::BTreeSet::new();
    for file in walk(table)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
    {
        let footer = SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
        for group in footer.metadata().row_groups() {
            found.extend(group.columns().iter().map(|c| c.compression().to_string()));
        }
    }
    (property, found)
}

/// The reference pipeline with Silver created with deletion vectors and the fact refreshed by key
/// with them (`incremental.key`), as the benchmark's `medallion-dv` runs it.
pub fn keyed_fact(yaml: String) -> String {
    let fact = "    sql: sql/gold/fact_transactions.sql\n    target: gold.fact_transactions\n    \
                mode: overwrite\n    incremental: { column: txn_date, source: silver.transactions }\n";
    assert!(yaml.contains(fact), "the reference fact stage changed");
    yaml.replacen(
        "    mode: cdc\n    zorder_by: [dms_id]\n",
        "    mode: cdc\n    deletion_vectors: true\n    zorder_by: [dms_id]\n",
        1,
    )
    .replacen(
        fact,
        "    sql: sql/gold/fact_transactions.sql\n    target: gold.fact_transactions\n    \
         mode: overwrite\n    deletion_vectors: true\n    \
         incremental: { key: transaction_id, source: silver.transactions }\n",
        1,
    )
}

/// The reference pipeline with files of 1 MiB (Silver's first load then writes files of key ranges,
/// and the fact's files hold ranges of dates and keys) and a reconciliation of money on the fact
/// besides its count.
pub fn small_files_with_fact_sum(yaml: String) -> String {
    assert!(
        yaml.contains("  target_file_mb: 128\n"),
        "the reference file size changed"
    );
    let yaml = yaml.replacen("  target_file_mb: 128\n", "  target_file_mb: 1\n", 1);
    let fact_check = "      - name: one_fact_per_silver_row\n";
    assert!(
        yaml.contains(fact_check),
        "the reference fact check changed"
    );
    yaml.replacen(
        fact_check,
        &format!(
            "      - name: fact_amount_matches_silver\n        \
             query: SELECT COALESCE(SUM(amount), 0) FROM candidate\n        \
             equals: SELECT COALESCE(SUM(amount), 0) FROM silver.transactions\n{fact_check}"
        ),
        1,
    )
}

/// That the fact's checks in a run's `log` (with `medallion::runner` and `medallion::checks` at debug)
/// read some of its files whole and cut the others, and took the sum over those read whole file by
/// file, from as many files. Some files are whole when the batch changes only recent rows and the
/// data spans more than one of the fact's `txn_year` partitions (its files of earlier years).
pub fn assert_fact_checked_on_whole_files(log: &str) {
    let number = |line: &str, field: &str| -> u64 {
        line.split(&format!("{field}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {line}"))
    };
    let kept = log
        .lines()
        .find(|l| {
            l.contains("stage=gold_fact_transactions") && l.contains("the target's rows that stay")
        })
        .unwrap_or_else(|| panic!("the fact's files were not split: {log}"));
    assert!(number(kept, "files_whole") > 0, "{kept}");
    assert!(number(kept, "files_cut") > 0, "{kept}");
    let summed = log
        .lines()
        .find(|l| {
            l.contains("stage=gold_fact_transactions")
                && l.contains("aggregate answered from its files' partials")
                && l.contains("fact_transactions files=")
        })
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(
        number(summed, "read"),
        number(kept, "files_whole"),
        "{summed}"
    );
}
