//! Concurrent writers on one lake: pipelines of different names (the run lock serializes only runs of
//! one pipeline) run at the same moment, each landing its own files into one shared Bronze table and
//! writing its own Silver table, while all of them append to the shared state tables. Every commit must
//! land exactly once, on local disk (atomic rename) as on S3 (conditional PUT, in `s3.rs`).

use std::process::{Child, Command, Stdio};

use medallion::storage::Location;

use crate::common::{BIN, Scratch, assert_success, query};

/// Runs `writers` pipelines against `lake` at the same time, three rounds, and checks that nothing was
/// lost or written twice. `log` lists the file names in the shared table's `_delta_log/`.
pub async fn race_writers(
    scratch: &Scratch,
    lake: &str,
    env: &[(&str, String)],
    read: &Location,
    log: &dyn Fn() -> Vec<String>,
) {
    let writers = 4;
    let rounds = 3;
    let project = scratch.dir.path().join("project");
    std::fs::create_dir_all(project.join("pipelines")).expect("project");
    std::fs::create_dir_all(project.join("sql/silver")).expect("sql");
    for writer in 0..writers {
        let yaml = format!(
            "name: writer{writer}\nlake: ${{MEDALLION_LAKE}}\nsources:\n  - name: events{writer}\n    path: {landing}/w{writer}\n    columns: [id, value]\n\
             stages:\n  - name: land\n    layer: bronze\n    ingest: events{writer}\n    target: bronze.events\n\
             \x20 - name: mine\n    layer: silver\n    sql: sql/silver/mine{writer}.sql\n    target: silver.mine{writer}\n",
            landing = scratch.landing().display(),
        );
        std::fs::write(project.join(format!("pipelines/w{writer}.yaml")), yaml).expect("yaml");
        std::fs::write(
            project.join(format!("sql/silver/mine{writer}.sql")),
            format!(
                "-- The rows writer {writer} landed, one per id.\nSELECT id, CAST(value AS BIGINT) AS value FROM bronze.events WHERE id LIKE '{writer}-%'\n"
            ),
        )
        .expect("sql");
    }
    let mut expected = vec![0u64; writers];
    let mut relanded = 0;
    let mut summaries = Vec::new();
    for round in 0..rounds {
        for (writer, expected) in expected.iter_mut().enumerate() {
            let dir = scratch.landing().join(format!("w{writer}"));
            std::fs::create_dir_all(&dir).expect("landing");
            let rows = 50 + writer * 7 + round;
            let mut csv = String::from("id,value\n");
            for row in 0..rows {
                csv.push_str(&format!("{writer}-{round}-{row},{row}\n"));
            }
            std::fs::write(dir.join(format!("part-{round}.csv")), csv).expect("file");
            *expected += rows as u64;
        }
        let children: Vec<Child> = (0..writers)
            .map(|writer| {
                Command::new(BIN)
                    .args(["run", &format!("pipelines/w{writer}.yaml")])
                    .current_dir(&project)
                    .env("MEDALLION_LAKE", lake)
                    .env("RUST_LOG", "warn")
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().expect("wait");
            assert_success(&output);
            summaries.push(crate::common::text(&output));
            relanded += String::from_utf8_lossy(&output.stderr)
                .matches("landing again at the next version")
                .count();
        }
    }
    // Bronze rows carry their commit's version, so a writer that lost a race lands again rather than
    // being rebased; the state tables' appends are rebased by delta-rs. Either way nothing is lost.
    println!("bronze landings repeated after losing a commit race: {relanded}");
    let total: u64 = expected.iter().sum();
    let landings = writers * rounds;
    let rows = query(
        read,
        &["bronze.events"],
        "SELECT COUNT(*), COUNT(DISTINCT id), COUNT(DISTINCT _source_file || _run_id), \
         COUNT(DISTINCT _batch_id) FROM bronze.events",
    )
    .await;
    assert_eq!(
        rows[0],
        [total, total, landings as u64, landings as u64].map(|n| n.to_string()),
        "every writer's every commit landed, none twice, each with its own batch id"
    );
    for (writer, expected) in expected.iter().enumerate() {
        let table = format!("silver.mine{writer}");
        let mine = query(read, &[&table], &format!("SELECT COUNT(*) FROM {table}")).await;
        assert_eq!(
            mine[0][0],
            expected.to_string(),
            "{table}; the runs:\n{}",
            summaries.join("\n")
        );
    }
    let runs = query(
        read,
        &["_medallion.runs"],
        "SELECT COUNT(*) FROM _medallion.runs WHERE status = 'succeeded'",
    )
    .await;
    assert_eq!(runs[0][0], landings.to_string(), "every run recorded once");
    // One commit per landing (plus the table's creation), numbered without gaps.
    let mut versions: Vec<u64> = log()
        .iter()
        .filter_map(|name| name.strip_suffix(".json")?.parse().ok())
        .collect();
    versions.sort();
    let commits = versions.len() as u64;
    assert_eq!(
        versions,
        (0..commits).collect::<Vec<_>>(),
        "no gap in the log"
    );
    assert_eq!(commits, landings as u64 + 1, "one commit per landing");
    assert!(relanded > 0, "the writers raced for commits");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_to_one_table_on_local_disk_lose_no_commit() {
    let scratch = Scratch::new();
    let lake = scratch.lake();
    let log_dir = lake.join("bronze/events/_delta_log");
    let log = || {
        std::fs::read_dir(&log_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    race_writers(
        &scratch,
        &lake.to_string_lossy(),
        &[],
        &Location::local(&lake),
        &log,
    )
    .await;
}
