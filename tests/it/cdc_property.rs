//! Property test of CDC apply: random change histories, cut into DMS files, delivered in random order over
//! several runs with random re-deliveries. After every run Silver must equal an in-memory model of the
//! semantics of MISSION.md ("Change-apply semantics"), computed from the distinct files delivered so far.
//!
//! `MEDALLION_CDC_CASES` sets the number of cases (default 200); a failure prints the seed of its case, and
//! `MEDALLION_CDC_SEED` replays that one case.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use futures::StreamExt;
use medallion::runner::{RunOptions, StageOutcome};

use crate::common::query;

/// A small deterministic generator (SplitMix64), so that a seed names a case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    op: char,
    /// Seconds; coarse on purpose so that many changes share a commit timestamp.
    ts: u32,
    key: u32,
    /// `None` for a key-only delete (every other field empty).
    value: Option<String>,
}

#[derive(Debug, Clone)]
struct DmsFile {
    /// Name as DMS gives it: `LOAD…` for the full load, a time-ordered name for change files.
    name: String,
    full_load: bool,
    changes: Vec<Change>,
}

impl DmsFile {
    fn csv(&self) -> String {
        let mut out = String::from(if self.full_load {
            "dms_commit_ts,id,val\n"
        } else {
            "Op,dms_commit_ts,id,val\n"
        });
        for change in &self.changes {
            let ts = format!(
                "2020-01-01 00:{:02}:{:02}.000000",
                change.ts / 60,
                change.ts % 60
            );
            let value = change.value.as_deref().unwrap_or("");
            if self.full_load {
                out.push_str(&format!("{ts},{},{value}\n", change.key));
            } else {
                out.push_str(&format!("{},{ts},{},{value}\n", change.op, change.key));
            }
        }
        out
    }
}

fn history(rng: &mut Rng) -> Vec<DmsFile> {
    let keys = 100 + rng.below(200) as u32;
    let mut files = Vec::new();
    let mut load = Vec::new();
    for key in 0..keys {
        if rng.chance(60) {
            load.push(Change {
                op: 'I',
                ts: rng.below(3) as u32,
                key,
                value: Some(format!("load{key}")),
            });
        }
    }
    files.push(DmsFile {
        name: "LOAD00000001.csv".into(),
        full_load: true,
        changes: load,
    });
    let change_files = 3 + rng.below(6) as u32;
    for index in 0..change_files {
        let mut changes = Vec::new();
        let rows = 5 + rng.below(80);
        for row in 0..rows {
            // Hot keys get several changes in one file; timestamps overlap between neighbouring files.
            let key = if rng.chance(30) {
                rng.below(10) as u32
            } else {
                rng.below(keys as u64) as u32
            };
            let ts = 2 + index * 3 + rng.below(5) as u32;
            let change = match rng.below(10) {
                0..=2 => Change {
                    op: 'I',
                    ts,
                    key,
                    value: Some(format!("i{index}r{row}")),
                },
                3..=6 => Change {
                    op: 'U',
                    ts,
                    key,
                    value: Some(format!("u{index}r{row}")),
                },
                7 => Change {
                    op: 'D',
                    ts,
                    key,
                    value: Some(format!("d{index}r{row}")),
                },
                _ => Change {
                    op: 'D',
                    ts,
                    key,
                    value: None,
                },
            };
            changes.push(change);
        }
        files.push(DmsFile {
            name: format!("20200101-{:010}.csv", 1000 + index),
            full_load: false,
            changes,
        });
    }
    files
}

/// The semantics, without medallion: per key, the change with the greatest (commit ts, file order with the
/// full load first, then name, row) wins; a delete leaves the key absent.
fn model(delivered: &[&DmsFile]) -> BTreeMap<u32, String> {
    // (commit ts, is a change file, file name, row): the order of MISSION.md.
    type Sequence = (u32, bool, String, usize);
    let mut last: BTreeMap<u32, (Sequence, &Change)> = BTreeMap::new();
    for file in delivered {
        for (row, change) in file.changes.iter().enumerate() {
            let order = (change.ts, !file.full_load, file.name.clone(), row);
            if last.get(&change.key).is_none_or(|(o, _)| *o < order) {
                last.insert(change.key, (order, change));
            }
        }
    }
    last.into_iter()
        .filter(|(_, (_, c))| c.op != 'D')
        .map(|(k, (_, c))| (k, c.value.clone().unwrap_or_default()))
        .collect()
}

const PIPELINE: &str = r#"
name: cdc_property
lake: ./lake
sources:
  - name: items
    path: ./landing/items
    format: csv
    columns: [id, val]
    key: [id]
    dms: { timestamp_column: dms_commit_ts }
stages:
  - name: bronze_items
    layer: bronze
    ingest: items
    target: bronze.items
  - name: silver_items
    layer: silver
    sql: silver_items.sql
    target: silver.items
    mode: cdc
    keys: [id]
    sequence_by: [_commit_ts, _file_order, _source_row]
    op: { column: _op, delete: [D] }
"#;

const SQL: &str = "SELECT CAST(id AS BIGINT) AS id, NULLIF(val, '') AS val, \
    CAST(dms_commit_ts AS TIMESTAMP) AS _commit_ts, _file_order, _source_row, COALESCE(op, 'I') AS _op \
    FROM bronze.items";

/// Writes the project into `dir`; with `deletion_vectors`, Silver is created with them.
fn write_project(dir: &Path, deletion_vectors: bool) -> PathBuf {
    std::fs::create_dir_all(dir.join("landing/items")).expect("landing");
    std::fs::write(dir.join("silver_items.sql"), SQL).expect("sql");
    let file = dir.join("pipeline.yaml");
    let text = PIPELINE
        .replace("./lake", &dir.join("lake").display().to_string())
        .replace("./landing", &dir.join("landing").display().to_string());
    let text = if deletion_vectors {
        text.replace(
            "    mode: cdc\n",
            "    mode: cdc\n    deletion_vectors: true\n",
        )
    } else {
        text
    };
    std::fs::write(&file, text).expect("pipeline");
    file
}

async fn run_case(seed: u64, deletion_vectors: bool) -> Result<(), String> {
    let mut rng = Rng(seed);
    let files = history(&mut rng);
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pipeline_file = write_project(scratch.path(), deletion_vectors);
    let pipeline = medallion::config::load(&pipeline_file).map_err(|e| e.to_string())?;
    let landing = scratch.path().join("landing/items");

    let mut order: Vec<usize> = (0..files.len()).collect();
    rng.shuffle(&mut order);
    let runs = 2 + rng.below(3) as usize;
    let mut delivered: Vec<usize> = Vec::new();
    let chunk = order.len().div_ceil(runs);
    for (run, batch) in order.chunks(chunk).enumerate() {
        for &index in batch {
            let file = &files[index];
            std::fs::write(landing.join(&file.name), file.csv()).map_err(|e| e.to_string())?;
            delivered.push(index);
        }
        // Re-deliveries: a landed file again under another folder (same content, new path).
        if rng.chance(50) && !delivered.is_empty() {
            let again = delivered[rng.below(delivered.len() as u64) as usize];
            let folder = landing.join(format!("again{run}"));
            std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
            std::fs::write(folder.join(&files[again].name), files[again].csv())
                .map_err(|e| e.to_string())?;
        }
        let report = medallion::runner::run(
            &pipeline,
            &RunOptions {
                max_parallel: 1,
                ..RunOptions::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        for stage in &report.stages {
            if let StageOutcome::Failed(message) = &stage.outcome {
                return Err(format!(
                    "run {run}: stage {} failed: {message}",
                    stage.stage
                ));
            }
        }
        let seen: Vec<&DmsFile> = delivered.iter().map(|&i| &files[i]).collect();
        let want = model(&seen);
        let lake = scratch.path().join("lake");
        let rows = if lake.join("silver/items/_delta_log").is_dir() {
            query(
                &lake,
                &["silver.items"],
                "SELECT id, COALESCE(val, '') FROM silver.items ORDER BY id",
            )
            .await
        } else {
            Vec::new()
        };
        let got: BTreeMap<u32, String> = rows
            .into_iter()
            .map(|r| (r[0].parse().unwrap_or(u32::MAX), r[1].clone()))
            .collect();
        if got != want {
            let missing: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(k) != Some(v))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|(k, v)| want.get(k) != Some(v))
                .take(5)
                .collect();
            return Err(format!(
                "after run {run} (files delivered in order {:?}): silver has {} rows, the model {}; \
                 expected but not found: {missing:?}; found but not expected: {extra:?}",
                delivered
                    .iter()
                    .map(|&i| files[i].name.as_str())
                    .collect::<Vec<_>>(),
                got.len(),
                want.len()
            ));
        }
    }
    Ok(())
}

/// The seeds of the cases: `MEDALLION_CDC_SEED` alone, or `MEDALLION_CDC_CASES` of them (default
/// `cases`).
fn seeds(cases: u64) -> Vec<u64> {
    match std::env::var("MEDALLION_CDC_SEED") {
        Ok(seed) => vec![seed.parse().expect("MEDALLION_CDC_SEED is a number")],
        Err(_) => {
            let cases: u64 = std::env::var("MEDALLION_CDC_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(cases);
            (1..=cases)
                .map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D))
                .collect()
        }
    }
}

/// Runs the cases of `seeds`, four at a time, and fails with the seeds of those that fail.
async fn run_cases(seeds: Vec<u64>, deletion_vectors: bool) {
    let failures: Vec<String> = futures::stream::iter(seeds)
        .map(|seed| async move {
            run_case(seed, deletion_vectors)
                .await
                .err()
                .map(|e| format!("seed {seed}: {e}"))
        })
        .buffer_unordered(4)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "{} case(s) failed; replay one with MEDALLION_CDC_SEED=<seed>:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silver_equals_the_model_whatever_the_delivery_order() {
    run_cases(seeds(200), false).await;
}

/// The same histories into a Silver created with deletion vectors: each run marks the rows it
/// replaces or deletes, and Silver read through the vectors equals the model after every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silver_with_deletion_vectors_equals_the_model_whatever_the_delivery_order() {
    run_cases(seeds(60), true).await;
}

/// A small change batch into a table of many files reads and rewrites only the files whose key range can
/// hold its keys, and the run summary says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_batch_rewrites_few_files() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let pipeline_file = write_project(scratch.path(), false);
    let pipeline = medallion::config::load(&pipeline_file).expect("pipeline");
    let landing = scratch.path().join("landing/items");
    let options = RunOptions {
        max_parallel: 1,
        ..RunOptions::default()
    };
    // Ten runs of inserts over disjoint key ranges: ten files in Silver.
    for file in 0..10u32 {
        let changes = (0..500)
            .map(|i| Change {
                op: 'I',
                ts: file,
                key: file * 1000 + i,
                value: Some(format!("v{file}")),
            })
            .collect();
        let dms = DmsFile {
            name: format!("20200101-{:010}.csv", file),
            full_load: false,
            changes,
        };
        std::fs::write(landing.join(&dms.name), dms.csv()).expect("write");
        medallion::runner::run(&pipeline, &options)
            .await
            .expect("run");
    }
    let dms = DmsFile {
        name: "20200101-0000000099.csv".into(),
        full_load: false,
        changes: vec![
            Change {
                op: 'U',
                ts: 50,
                key: 3_007,
                value: Some("changed".into()),
            },
            Change {
                op: 'D',
                ts: 50,
                key: 3_100,
                value: None,
            },
        ],
    };
    std::fs::write(landing.join(&dms.name), dms.csv()).expect("write");
    let report = medallion::runner::run(&pipeline, &options)
        .await
        .expect("run");
    let silver = report.stage("silver_items").expect("silver stage");
    assert_eq!(
        (silver.rows_updated, silver.rows_deleted),
        (1, 1),
        "{:?}",
        silver
    );
    assert_eq!(
        silver.files_removed, 1,
        "only the file holding keys 3000..3499 is rewritten"
    );
    assert!(
        silver.files_scanned <= 2,
        "the merge reads only the files whose key range can hold the batch: {} of 10 read",
        silver.files_scanned
    );
    let json = report.to_json();
    assert_eq!(json["stages"][1]["files_removed"], 1);

    // The rewritten file lost the deleted row and holds the update; the other files' rows are intact.
    let lake = scratch.path().join("lake");
    let rows = query(
        &lake,
        &["silver.items"],
        "SELECT COUNT(*), COUNT(DISTINCT id), SUM(CAST(id AS BIGINT)), \
           MAX(CASE WHEN id = 3007 THEN val END), COUNT(CASE WHEN id = 3100 THEN 1 END), \
           COUNT(CASE WHEN val = 'v3' THEN 1 END) \
         FROM silver.items",
    )
    .await;
    let all_ids: u64 = (0..10u64)
        .flat_map(|f| (0..500u64).map(move |i| f * 1000 + i))
        .sum();
    assert_eq!(
        rows,
        vec![vec![
            "4999".to_string(),
            "4999".to_string(),
            (all_ids - 3_100).to_string(),
            "changed".to_string(),
            "0".to_string(),
            "498".to_string(),
        ]]
    );
}

/// The `add` actions of a Delta table's current files, replayed from its JSON log: (path, rows, least
/// and greatest `column`).
fn files_with_key_range(table: &Path, column: &str) -> Vec<(String, u64, i64, i64)> {
    let mut log: Vec<PathBuf> = std::fs::read_dir(table.join("_delta_log"))
        .expect("log")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    log.sort();
    let mut files = std::collections::BTreeMap::new();
    for commit in log {
        let text = std::fs::read_to_string(&commit).expect("commit");
        for line in text.lines() {
            let action: serde_json::Value = serde_json::from_str(line).expect("action");
            if let Some(add) = action.get("add") {
                let stats: serde_json::Value =
                    serde_json::from_str(add["stats"].as_str().expect("stats")).expect("json");
                let range = (
                    stats["numRecords"].as_u64().expect("rows"),
                    stats["minValues"][column].as_i64().expect("min"),
                    stats["maxValues"][column].as_i64().expect("max"),
                );
                files.insert(add["path"].as_str().expect("path").to_string(), range);
            }
            if let Some(remove) = action.get("remove") {
                files.remove(remove["path"].as_str().expect("path"));
            }
        }
    }
    files
        .into_iter()
        .map(|(path, (rows, low, high))| (path, rows, low, high))
        .collect()
}

/// The most other files whose key range overlaps one file's. A range written by two writers (one per
/// core of the test's runtime) has two files that overlap each other and no other.
fn most_overlapped(files: &[(String, u64, i64, i64)]) -> usize {
    files
        .iter()
        .map(|a| {
            files
                .iter()
                .filter(|b| b.0 != a.0 && b.2 <= a.3 && a.2 <= b.3)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// A first load whose keys arrive in any order is written as files of disjoint key ranges (the writes of
/// an integer-keyed cdc table are clustered by key), so that a later batch changing a few keys rewrites
/// only the file of their range, and the rewrite keeps the ranges apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_load_in_any_key_order_is_written_in_files_of_disjoint_key_ranges() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let pipeline_file = write_project(scratch.path(), false);
    // Files of 1 MiB: the 200,000 rows below are cut into several.
    let text = std::fs::read_to_string(&pipeline_file).expect("pipeline");
    std::fs::write(
        &pipeline_file,
        text.replace("stages:", "maintenance: { target_file_mb: 1 }\nstages:"),
    )
    .expect("pipeline");
    let pipeline = medallion::config::load(&pipeline_file).expect("pipeline");
    let landing = scratch.path().join("landing/items");
    let mut keys: Vec<u32> = (0..200_000).collect();
    Rng(7).shuffle(&mut keys);
    let (first, second) = keys.split_at(100_000);
    for (n, part) in [first, second].into_iter().enumerate() {
        let dms = DmsFile {
            name: format!("LOAD{:08}.csv", n + 1),
            full_load: true,
            changes: part
                .iter()
                .map(|&key| Change {
                    op: 'I',
                    ts: 0,
                    key,
                    value: Some(format!("v{key}")),
                })
                .collect(),
        };
        std::fs::write(landing.join(&dms.name), dms.csv()).expect("write");
    }
    let options = RunOptions::default();
    let report = medallion::runner::run(&pipeline, &options)
        .await
        .expect("run");
    assert!(report.succeeded(), "{}", report.to_json());
    let table = scratch.path().join("lake/silver/items");
    let files = files_with_key_range(&table, "id");
    assert!(files.len() >= 3, "several files: {files:?}");
    assert!(most_overlapped(&files) <= 1, "{files:?}");
    assert_eq!(files.iter().map(|f| f.1).sum::<u64>(), 200_000);

    // Two updates and a delete in the range of one file: only that file is read again and rewritten.
    let (_, _, low, high) = files[files.len() / 2].clone();
    let middle = ((low + high) / 2) as u32;
    let dms = DmsFile {
        name: "20200101-0000000001.csv".into(),
        full_load: false,
        changes: vec![
            Change {
                op: 'U',
                ts: 5,
                key: low as u32,
                value: Some("changed".into()),
            },
            Change {
                op: 'U',
                ts: 5,
                key: high as u32,
                value: Some("changed".into()),
            },
            Change {
                op: 'D',
                ts: 5,
                key: middle,
                value: None,
            },
        ],
    };
    std::fs::write(landing.join(&dms.name), dms.csv()).expect("write");
    let report = medallion::runner::run(&pipeline, &options)
        .await
        .expect("run");
    let silver = report.stage("silver_items").expect("silver stage");
    assert_eq!(
        (silver.rows_updated, silver.rows_deleted),
        (2, 1),
        "{silver:?}"
    );
    let after = files_with_key_range(&table, "id");
    let removed: Vec<_> = files.iter().filter(|f| !after.contains(f)).collect();
    assert!(
        !removed.is_empty() && removed.len() <= 2 && silver.files_removed as usize == removed.len(),
        "only the files of the changed keys' range are rewritten: {removed:?} of {files:?}"
    );
    assert!(
        removed.iter().all(|f| f.2 <= high && low <= f.3),
        "{removed:?}"
    );
    assert!(most_overlapped(&after) <= 1, "{after:?}");
    assert_eq!(after.iter().map(|f| f.1).sum::<u64>(), 199_999);
    let rows = query(
        &scratch.path().join("lake"),
        &["silver.items"],
        &format!(
            "SELECT COUNT(*), COUNT(DISTINCT id), COUNT(CASE WHEN val = 'changed' THEN 1 END), \
               COUNT(CASE WHEN id = {middle} THEN 1 END) FROM silver.items"
        ),
    )
    .await;
    assert_eq!(rows, vec![vec!["199999", "199999", "2", "0"]]);
}
