//! `medallion generate`: a faithful, deterministic imitation of the Kaggle financial-transactions data as
//! AWS DMS lands it (MISSION.md): full-load `LOAD*` files for transactions, cards and users, then one change
//! file per day with inserts, updates and deletes. Rows are written as they are made; memory holds only
//! the live transaction ids and their dates (12 bytes a row).

mod model;
mod writer;

use std::path::{Path, PathBuf};

use chrono::{Duration, NaiveDate, NaiveDateTime};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use writer::FileStyle;
use writer::RowSink;

use model::{Catalog, TXN_COLUMNS};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot write `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{}`: {}", .0.display(), .1)]
    Write(PathBuf, String),
    #[error("invalid generate options: {0}")]
    Options(String),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub out: PathBuf,
    pub transactions: u64,
    pub days: u32,
    /// How many of the last days arrive as change files (one file per day) instead of in the full load.
    pub change_days: u32,
    pub seed: u64,
    pub style: FileStyle,
    /// Put change files under `YYYY/MM/DD/` folders (DMS DatePartitionEnabled).
    pub date_folders: bool,
    /// Add the `$AR_H_CHANGE_SEQ` column.
    pub change_seq: bool,
    /// Rows per full-load file.
    pub rows_per_load_file: u64,
    /// Rows of one extra change file under `<out>/batch/` (0: none), for benchmarks.
    pub change_batch: u64,
    /// The batch's updates and deletes hit keys of its last this many days (0: of all days).
    pub change_batch_days: u32,
}

/// Counts of what was written, for the CLI summary.
#[derive(Debug, Default, Clone)]
pub struct GenerateReport {
    pub files: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub cards: u64,
    pub users: u64,
}

/// The last day of generated transactions; the data ends where the Kaggle set ends.
const LAST_DAY: (i32, u32, u32) = (2019, 10, 31);
const TIMESTAMP_COLUMN: &str = "dms_commit_ts";

pub fn generate(options: &GenerateOptions) -> Result<GenerateReport, GenerateError> {
    if options.days == 0 || options.transactions == 0 {
        return Err(GenerateError::Options(
            "`--transactions` and `--days` must be at least 1".into(),
        ));
    }
    if options.change_days >= options.days {
        return Err(GenerateError::Options(format!(
            "`--change-days` ({}) must be less than `--days` ({})",
            options.change_days, options.days
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let catalog = Catalog::new(&mut rng, options.transactions);
    let landing = options.out.join("public");
    let mut report = GenerateReport::default();

    let (last_y, last_m, last_d) = LAST_DAY;
    let last_day = NaiveDate::from_ymd_opt(last_y, last_m, last_d)
        .ok_or_else(|| GenerateError::Options("bad constant date".into()))?;
    let first_day = last_day - Duration::days(i64::from(options.days) - 1);
    let load_days = options.days - options.change_days;
    let load_time = (first_day + Duration::days(i64::from(load_days)))
        .and_hms_opt(0, 5, 0)
        .unwrap_or_default();
    let mut seq = ChangeSeq::default();

    // Cards and users: full load only.
    report.users = catalog.write_users(&landing.join("users"), options, load_time, &mut seq)?;
    report.cards = catalog.write_cards(&landing.join("cards"), options, load_time, &mut seq)?;
    report.files += 2;
    write_mcc(&options.out)?;
    report.files += 1;

    // Transactions: ids grow with time, with gaps; per day a share of N proportional to 1 (flat).
    let per_day = options.transactions / u64::from(options.days);
    let extra = options.transactions % u64::from(options.days);
    let mut live = Live::default();
    let mut next_id: i64 = 7_475_327;
    let dir = landing.join("transactions");

    let mut load = LoadWriter::new(&dir, options, load_time);
    for day in 0..load_days {
        let count = per_day + u64::from(u64::from(day) < extra);
        let date = first_day + Duration::days(i64::from(day));
        for _ in 0..count {
            let id = next_id;
            next_id += 1 + i64::from(rng.random_range(0..3u8));
            let minute = day_minute(&mut rng, date);
            let row = catalog.transaction(options.seed, id, minute, 0);
            load.write(&row, &mut seq)?;
            live.push(id, minute);
            report.inserts += 1;
        }
    }
    report.files += load.finish()?;

    let mut changes = ChangeWriter {
        options,
        catalog: &catalog,
        rng: &mut rng,
        live: &mut live,
        next_id: &mut next_id,
        seq: &mut seq,
        report: &mut report,
        recent: None,
    };
    for day in load_days..options.days {
        let count = per_day + u64::from(u64::from(day) < extra);
        let date = first_day + Duration::days(i64::from(day));
        // The day's changes are committed the next morning, in one file named by its first commit.
        let mix = Mix {
            inserts: count,
            updates: count / 10,
            deletes: (count / 100).max(1),
        };
        changes.write_file(&dir, date, date + Duration::days(1), mix)?;
    }
    if options.change_batch > 0 {
        // One more change file, a day after the last, kept apart under `<out>/batch/` for benchmarks:
        // half updates of keys picked over all dates (or the last `change_batch_days`), 1% deletes, the
        // rest new transactions.
        let rows = options.change_batch;
        if options.change_batch_days > 0 {
            // Live keys are in date order but for the few that deletes moved: the last ones are recent.
            let share = u64::from(options.change_batch_days.min(options.days));
            let live = changes.live.len() as u64;
            changes.recent = Some((live * share / u64::from(options.days)).max(1) as usize);
        }
        let mix = Mix {
            updates: rows / 2,
            deletes: rows / 100,
            inserts: rows - rows / 2 - rows / 100,
        };
        let batch_dir = options
            .out
            .join("batch")
            .join("public")
            .join("transactions");
        changes.write_file(&batch_dir, last_day, last_day + Duration::days(2), mix)?;
    }
    Ok(report)
}

/// How many changes of each kind a change file holds.
struct Mix {
    inserts: u64,
    updates: u64,
    deletes: u64,
}

/// Writes transaction change files, keeping the live ids in step so updates and deletes hit real keys.
struct ChangeWriter<'a> {
    options: &'a GenerateOptions,
    catalog: &'a Catalog,
    rng: &'a mut ChaCha8Rng,
    live: &'a mut Live,
    next_id: &'a mut i64,
    seq: &'a mut ChangeSeq,
    report: &'a mut GenerateReport,
    /// Updates and deletes pick among the this many most recent live keys (all when `None`).
    recent: Option<usize>,
}

impl ChangeWriter<'_> {
    /// A live key for an update or delete: any, or one of the most recent. The caller checks that
    /// there is one.
    fn pick(&mut self) -> usize {
        let len = self.live.len();
        let low = self.recent.map_or(0, |recent| len.saturating_sub(recent));
        self.rng.random_range(low..len)
    }

    /// One change file in `dir` (or its `YYYY/MM/DD/` folder), committed from 02:00 on `commit_day`:
    /// inserts dated `date`, updates and deletes of live keys, in random order.
    fn write_file(
        &mut self,
        dir: &Path,
        date: NaiveDate,
        commit_day: NaiveDate,
        mix: Mix,
    ) -> Result<(), GenerateError> {
        let options = self.options;
        let commit_start = commit_day.and_hms_opt(2, 0, 0).unwrap_or_default();
        let name = commit_start.format("%Y%m%d-%H%M%S0000").to_string();
        let path = if options.date_folders {
            dir.join(commit_start.format("%Y/%m/%d").to_string())
                .join(format!("{name}.{}", options.style.extension()))
        } else {
            dir.join(format!("{name}.{}", options.style.extension()))
        };
        let mut columns = vec!["Op", TIMESTAMP_COLUMN];
        columns.extend(TXN_COLUMNS);
        if options.change_seq {
            columns.push("$AR_H_CHANGE_SEQ");
        }
        let mut sink = RowSink::create(&path, options.style, &columns)?;
        let mut clock = Clock::new(commit_start);
        let Mix {
            mut inserts,
            mut updates,
            mut deletes,
        } = mix;
        let mut version: u32 = 1;
        while inserts + updates + deletes > 0 {
            let pick = self.rng.random_range(0..inserts + updates + deletes);
            let commit = clock.tick(self.rng);
            if pick < inserts || self.live.is_empty() {
                inserts = inserts.saturating_sub(1);
                let id = *self.next_id;
                *self.next_id += 1 + i64::from(self.rng.random_range(0..3u8));
                let minute = day_minute(self.rng, date);
                let row = self.catalog.transaction(options.seed, id, minute, 0);
                write_change(&mut sink, "I", &commit, &row, options, self.seq)?;
                self.live.push(id, minute);
                self.report.inserts += 1;
            } else if pick < inserts + updates {
                updates -= 1;
                // An update carries the full new row; some keys change twice in one file.
                let index = self.pick();
                let (id, mut minute) = self.live.get(index);
                let repeats = if self.rng.random_ratio(1, 10) { 2 } else { 1 };
                for _ in 0..repeats {
                    version += 1;
                    if self.rng.random_ratio(1, 20) {
                        // A correction that moves the transaction to another day.
                        minute = minute.saturating_add(self.rng.random_range(1..=2) * 1440);
                        self.live.set_minute(index, minute);
                    }
                    let row = self.catalog.transaction(options.seed, id, minute, version);
                    write_change(&mut sink, "U", &commit, &row, options, self.seq)?;
                    self.report.updates += 1;
                }
            } else {
                deletes -= 1;
                // A delete from PostgreSQL carries only the key.
                let index = self.pick();
                let (id, _) = self.live.remove(index);
                let mut row = vec![String::new(); TXN_COLUMNS.len()];
                row[0] = id.to_string();
                write_change(&mut sink, "D", &commit, &row, options, self.seq)?;
                self.report.deletes += 1;
            }
        }
        sink.finish()?;
        self.report.files += 1;
        Ok(())
    }
}

fn write_change(
    sink: &mut RowSink,
    op: &str,
    commit: &str,
    row: &[String],
    options: &GenerateOptions,
    seq: &mut ChangeSeq,
) -> Result<(), GenerateError> {
    let mut fields: Vec<&str> = Vec::with_capacity(row.len() + 3);
    fields.push(op);
    fields.push(commit);
    fields.extend(row.iter().map(String::as_str));
    let next = seq.next();
    if options.change_seq {
        fields.push(&next);
    }
    sink.write(&fields)
}

fn write_mcc(out: &Path) -> Result<(), GenerateError> {
    let path = out.join("mcc_codes").join("mcc_codes.json");
    let io = |source| GenerateError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(path.parent().unwrap_or(out)).map_err(io)?;
    std::fs::write(&path, model::MCC_JSON).map_err(io)
}

/// Minutes since 1970 of a random time on `date`, busier in the day than at night.
fn day_minute(rng: &mut ChaCha8Rng, date: NaiveDate) -> u32 {
    let base = date
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp()
        / 60;
    let minute = if rng.random_ratio(4, 5) {
        rng.random_range(7 * 60..22 * 60)
    } else {
        rng.random_range(0..1440)
    };
    u32::try_from(base + minute).unwrap_or(u32::MAX)
}

/// Commit timestamps: strictly ordered within a file, with runs of changes sharing one timestamp (one
/// source transaction).
struct Clock {
    now: NaiveDateTime,
}

impl Clock {
    fn new(start: NaiveDateTime) -> Clock {
        Clock { now: start }
    }

    fn tick(&mut self, rng: &mut ChaCha8Rng) -> String {
        if !rng.random_ratio(1, 8) {
            self.now += Duration::microseconds(rng.random_range(1..2_000_000));
        }
        self.now.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
    }
}

/// DMS `$AR_H_CHANGE_SEQ`: 35 digits, strictly increasing.
#[derive(Default)]
struct ChangeSeq(u64);

impl ChangeSeq {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("{:035}", self.0)
    }
}

/// Live transaction ids with their minute, for picking update and delete targets.
#[derive(Default)]
struct Live {
    ids: Vec<i64>,
    minutes: Vec<u32>,
}

impl Live {
    fn push(&mut self, id: i64, minute: u32) {
        self.ids.push(id);
        self.minutes.push(minute);
    }
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    fn get(&self, index: usize) -> (i64, u32) {
        (self.ids[index], self.minutes[index])
    }
    fn set_minute(&mut self, index: usize, minute: u32) {
        self.minutes[index] = minute;
    }
    fn remove(&mut self, index: usize) -> (i64, u32) {
        (self.ids.swap_remove(index), self.minutes.swap_remove(index))
    }
}

/// Writes full-load rows into `LOAD00000001`, `LOAD00000002`, ... (8 upper-case hex digits).
struct LoadWriter<'a> {
    dir: &'a Path,
    options: &'a GenerateOptions,
    load_time: NaiveDateTime,
    sink: Option<RowSink>,
    files: u64,
    rows_in_file: u64,
}

impl<'a> LoadWriter<'a> {
    fn new(dir: &'a Path, options: &'a GenerateOptions, load_time: NaiveDateTime) -> Self {
        LoadWriter {
            dir,
            options,
            load_time,
            sink: None,
            files: 0,
            rows_in_file: 0,
        }
    }

    fn write(&mut self, row: &[String], seq: &mut ChangeSeq) -> Result<(), GenerateError> {
        if self.sink.is_none() || self.rows_in_file >= self.options.rows_per_load_file {
            if let Some(sink) = self.sink.take() {
                sink.finish()?;
            }
            self.files += 1;
            let path = self.dir.join(format!(
                "LOAD{:08X}.{}",
                self.files,
                self.options.style.extension()
            ));
            let mut columns = vec![TIMESTAMP_COLUMN];
            columns.extend(TXN_COLUMNS);
            if self.options.change_seq {
                columns.push("$AR_H_CHANGE_SEQ");
            }
            self.sink = Some(RowSink::create(&path, self.options.style, &columns)?);
            self.rows_in_file = 0;
        }
        let ts = self.load_time.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
        let mut fields: Vec<&str> = vec![&ts];
        fields.extend(row.iter().map(String::as_str));
        let next = seq.next();
        if self.options.change_seq {
            fields.push(&next);
        }
        self.rows_in_file += 1;
        match &mut self.sink {
            Some(sink) => sink.write(&fields),
            None => Ok(()),
        }
    }

    fn finish(mut self) -> Result<u64, GenerateError> {
        if let Some(sink) = self.sink.take() {
            sink.finish()?;
        }
        Ok(self.files)
    }
}

/// Writes a full-load-only table (cards, users) as `LOAD00000001`.
fn write_load_table(
    dir: &Path,
    options: &GenerateOptions,
    load_time: NaiveDateTime,
    seq: &mut ChangeSeq,
    columns: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<u64, GenerateError> {
    let path = dir.join(format!("LOAD00000001.{}", options.style.extension()));
    let mut header = vec![TIMESTAMP_COLUMN];
    header.extend(columns);
    if options.change_seq {
        header.push("$AR_H_CHANGE_SEQ");
    }
    let mut sink = RowSink::create(&path, options.style, &header)?;
    let ts = load_time.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    let mut count = 0;
    for row in rows {
        let mut fields: Vec<&str> = vec![&ts];
        fields.extend(row.iter().map(String::as_str));
        let next = seq.next();
        if options.change_seq {
            fields.push(&next);
        }
        sink.write(&fields)?;
        count += 1;
    }
    sink.finish()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Keys and their date in the full load, and the keys the batch updates or deletes.
    fn batch_targets(days_back: u32) -> (HashMap<i64, NaiveDate>, Vec<i64>) {
        let out = tempfile::tempdir().expect("temp dir");
        let options = GenerateOptions {
            out: out.path().to_path_buf(),
            transactions: 20_000,
            days: 100,
            change_days: 0,
            seed: 7,
            style: FileStyle {
                header: true,
                parquet: false,
                gzip: false,
            },
            date_folders: false,
            change_seq: false,
            rows_per_load_file: 50_000,
            change_batch: 2_000,
            change_batch_days: days_back,
        };
        generate(&options).expect("generate");
        let read = |dir: &Path| -> Vec<csv::StringRecord> {
            let mut rows = Vec::new();
            for entry in std::fs::read_dir(dir).expect("folder") {
                let mut reader = csv::Reader::from_path(entry.expect("entry").path()).expect("csv");
                rows.extend(reader.records().map(|r| r.expect("record")));
            }
            rows
        };
        let loaded = read(&out.path().join("public/transactions"))
            .iter()
            .map(|r| {
                let id = r[1].parse::<i64>().expect("id");
                let date = NaiveDate::parse_from_str(&r[2][..10], "%Y-%m-%d").expect("date");
                (id, date)
            })
            .collect();
        let changed = read(&out.path().join("batch/public/transactions"))
            .iter()
            .filter(|r| &r[0] != "I")
            .map(|r| r[2].parse::<i64>().expect("id"))
            .collect();
        (loaded, changed)
    }

    #[test]
    fn a_recent_change_batch_updates_and_deletes_only_keys_of_its_last_days() {
        let last = NaiveDate::from_ymd_opt(2019, 10, 31).expect("date");
        let (loaded, changed) = batch_targets(5);
        assert!(changed.len() > 900, "{} updates and deletes", changed.len());
        let oldest = changed
            .iter()
            .filter_map(|id| loaded.get(id))
            .min()
            .expect("changed keys of the load");
        // Five days back, and a day of slack for the keys that deletes moved.
        assert!(*oldest >= last - Duration::days(6), "oldest {oldest}");

        let (loaded, changed) = batch_targets(0);
        let oldest = changed
            .iter()
            .filter_map(|id| loaded.get(id))
            .min()
            .expect("changed keys of the load");
        assert!(*oldest <= last - Duration::days(90), "oldest {oldest}");
    }
}
