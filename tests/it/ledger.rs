//! The ingest ledger's checksums: BLAKE3 for what is landed now, and the SHA-256 that older versions
//! recorded still recognized, so that a lake landed by an older medallion keeps skipping re-deliveries and
//! stopping on rewritten files.

use std::{path::Path, sync::Arc};

use arrow::{
    array::{Array, ArrayRef, AsArray, RecordBatch, StringArray},
    compute::cast,
    datatypes::{DataType, Field, Schema},
};
use medallion::storage::Location;
use sha2::Digest;

use crate::common::{Scratch, assert_success, delta_version, on_bad_file, query, text};

/// The ledger's (file, checksum) rows of the transactions source, by file.
async fn ledger(lake: &Path) -> Vec<(String, String)> {
    query(
        lake,
        &["_medallion.ingested_files"],
        "SELECT file, checksum FROM _medallion.ingested_files WHERE source = 'transactions' \
         ORDER BY file",
    )
    .await
    .into_iter()
    .map(|row| (row[0].clone(), row[1].clone()))
    .collect()
}

/// The checksums of the files set aside as bad.
async fn bad_checksums(lake: &Path) -> Vec<Vec<String>> {
    query(
        lake,
        &["_medallion.bad_files"],
        "SELECT checksum FROM _medallion.bad_files",
    )
    .await
}

fn state_path(lake: &Path, table: &str) -> Location {
    Location::local(lake.join("_medallion").join(table))
}

/// Every row of the state table `table` (`ingested_files`, `bad_files`).
async fn read_state(lake: &Path, table: &str) -> Vec<RecordBatch> {
    let path = state_path(lake, table);
    let table = medallion::delta::open(&path)
        .await
        .expect("open")
        .expect("a state table");
    let provider = medallion::delta::provider(&path, &table)
        .await
        .expect("provider");
    let ctx = medallion::delta::session(None).expect("session");
    ctx.register_table("state", provider).expect("register");
    ctx.sql("SELECT * FROM state")
        .await
        .expect("query")
        .collect()
        .await
        .expect("collect")
}

fn strings(batch: &RecordBatch, column: &str) -> StringArray {
    let column = batch.column_by_name(column).expect("column");
    cast(column, &DataType::Utf8)
        .expect("cast")
        .as_string::<i32>()
        .clone()
}

/// Rewrites the state table `table` (`ingested_files`, `bad_files`) as a medallion before BLAKE3 wrote
/// it: each checksum the bare SHA-256 hex of its file, in its source's folder under `landing` (as
/// `pipelines/transactions.yaml` names them).
async fn make_legacy(lake: &Path, table: &str, landing: &Path) {
    let batches = read_state(lake, table).await;
    let path = state_path(lake, table);
    let table = medallion::delta::open(&path)
        .await
        .expect("open")
        .expect("a state table");
    let mut rewritten = Vec::new();
    for batch in batches {
        let sources = strings(&batch, "source");
        let files = strings(&batch, "file");
        let legacy: StringArray = (0..batch.num_rows())
            .map(|row| {
                let folder = match sources.value(row) {
                    "mcc_codes" => landing.join("mcc_codes"),
                    source => landing.join("public").join(source),
                };
                let file = folder.join(files.value(row));
                let bytes = std::fs::read(file).expect("landed file");
                Some(hex::encode(sha2::Sha256::digest(&bytes)))
            })
            .collect();
        let schema = batch.schema();
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            let column = match field.name().as_str() {
                "checksum" => Arc::new(legacy.clone()) as ArrayRef,
                _ if field.data_type() == &DataType::Utf8View => {
                    cast(column, &DataType::Utf8).expect("cast")
                }
                _ => column.clone(),
            };
            fields.push(Field::new(
                field.name(),
                column.data_type().clone(),
                field.is_nullable(),
            ));
            columns.push(column);
        }
        rewritten
            .push(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch"));
    }
    table
        .write(rewritten)
        .with_save_mode(deltalake::protocol::SaveMode::Overwrite)
        .await
        .expect("overwrite the state table");
}

/// Moves the file's modification time an hour back, so that the ledger no longer knows it unchanged
/// (and the time is not one of the last seconds, which the ledger does not trust).
fn touch(path: &Path) {
    set_modified(
        path,
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    );
}

fn set_modified(path: &Path, time: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open")
        .set_modified(time)
        .expect("set the modification time");
}

/// A change file no generated landing holds.
const NEW_FILE: &str = "20300101-0000000001.csv";

/// The version of Bronze's transactions table: it moves when a run lands anything.
fn bronze_version(scratch: &Scratch) -> Option<u64> {
    delta_version(&scratch.table("bronze", "transactions"))
}

#[tokio::test]
async fn checksums_are_blake3_and_an_older_ledgers_sha256_still_counts() {
    let scratch = Scratch::new();
    scratch.generate(200, 3, 2, 77);
    assert_success(&scratch.run());
    let folder = scratch.transactions_dir();

    // What a run lands now is recorded by its BLAKE3.
    let landed = ledger(&scratch.lake()).await;
    assert!(landed.len() >= 3, "full load and change files: {landed:?}");
    assert!(landed.iter().all(|(f, _)| f != NEW_FILE));
    for (file, checksum) in &landed {
        let bytes = std::fs::read(folder.join(file)).expect("landed file");
        assert_eq!(
            checksum,
            &format!("blake3:{}", blake3::hash(&bytes).to_hex()),
            "{file}"
        );
    }

    // The same lake as an older medallion left it.
    make_legacy(&scratch.lake(), "ingested_files", &scratch.landing()).await;
    assert!(
        ledger(&scratch.lake())
            .await
            .iter()
            .all(|(_, c)| c.len() == 64 && !c.starts_with("blake3:"))
    );
    let bronze = bronze_version(&scratch);
    // A change file (their names sort before the full load's `LOAD…`).
    let (file, _) = landed.first().expect("a landed file").clone();
    assert!(!file.starts_with("LOAD"), "{file}");

    // A landed file touched (same content, new modification time) is not landed again: it is hashed
    // again, and its SHA-256 matches.
    let original = folder.join(&file);
    let content = std::fs::read(&original).expect("read");
    touch(&original);
    let touched = scratch.run();
    assert_success(&touched);
    assert_eq!(bronze_version(&scratch), bronze, "nothing landed again");

    // The same content under another name is a re-delivery.
    let copy = folder.join("redelivered").join(&file);
    std::fs::create_dir_all(copy.parent().expect("parent")).expect("mkdir");
    std::fs::write(&copy, &content).expect("copy");
    let redelivered = scratch.run();
    assert_success(&redelivered);
    assert!(
        text(&redelivered).contains("same content as a file already landed"),
        "{}",
        text(&redelivered)
    );
    assert_eq!(
        bronze_version(&scratch),
        bronze,
        "the re-delivery is skipped"
    );
    std::fs::remove_file(&copy).expect("remove the copy");

    // A landed file rewritten with other bytes of the same size stops the ingest.
    let mut changed = content.clone();
    let last = changed.len() - 2;
    changed[last] = if changed[last] == b'0' { b'1' } else { b'0' };
    std::fs::write(&original, &changed).expect("rewrite");
    let stopped = scratch.run();
    assert!(!stopped.status.success(), "{}", text(&stopped));
    assert!(
        text(&stopped).contains(&format!(
            "landing file `{file}` was already ingested but its content changed"
        )),
        "{}",
        text(&stopped)
    );
    // The older entry is compared by its own algorithm.
    let sha256 = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes))[..12].to_string();
    assert!(
        text(&stopped).contains(&format!(
            "sha256 {} → {}",
            sha256(&content),
            sha256(&changed)
        )),
        "{}",
        text(&stopped)
    );
    assert_eq!(bronze_version(&scratch), bronze, "nothing landed");
    std::fs::write(&original, &content).expect("restore");

    // A new file lands, and the ledger records it by its BLAKE3 next to the older entries.
    let fresh = folder.join(NEW_FILE);
    std::fs::write(
        &fresh,
        "Op,dms_commit_ts,id,date,client_id,card_id,amount,use_chip,merchant_id,merchant_city,merchant_state,zip,mcc,errors\n\
         I,2030-01-01 00:00:00.000000,9900000001,2019-10-30 12:00:00,1,1,$10.00,Chip Transaction,5,Springfield,IL,62701.0,5812,\n",
    )
    .expect("new file");
    let landed_again = scratch.run();
    assert_success(&landed_again);
    assert_ne!(bronze_version(&scratch), bronze, "the new file landed");
    let after = ledger(&scratch.lake()).await;
    let (_, checksum) = after
        .iter()
        .find(|(f, _)| f == NEW_FILE)
        .expect("the new file in the ledger");
    assert_eq!(
        checksum,
        &format!(
            "blake3:{}",
            blake3::hash(&std::fs::read(&fresh).expect("read")).to_hex()
        )
    );
    assert_eq!(after.len(), landed.len() + 1);
}

#[tokio::test]
async fn a_file_an_older_medallion_set_aside_stays_aside() {
    let scratch = Scratch::new();
    scratch.generate(200, 3, 0, 78);
    let skip = on_bad_file("skip");
    assert_success(&scratch.run_edited(&skip, None));
    let bad = scratch
        .transactions_dir()
        .join("20300101-wrong_column_count.csv");
    std::fs::copy(
        crate::common::repo().join("tests/fixtures/bad/wrong_column_count.csv"),
        &bad,
    )
    .expect("deliver a bad file");
    let set_aside = scratch.run_edited(&skip, None);
    assert_success(&set_aside);
    assert!(
        text(&set_aside).contains("1 bad file(s) skipped"),
        "{}",
        text(&set_aside)
    );

    // As an older medallion recorded it, by its SHA-256.
    make_legacy(&scratch.lake(), "bad_files", &scratch.landing()).await;
    let before = bad_checksums(&scratch.lake()).await;
    assert_eq!(
        before,
        [[hex::encode(sha2::Sha256::digest(
            std::fs::read(&bad).expect("read")
        ))]]
    );

    // The next run hashes it again (a file set aside is not in the ledger): its SHA-256 is the one set
    // aside, so it is not read to be landed again, nor recorded again.
    let bronze = bronze_version(&scratch);
    let again = scratch.run_edited(&skip, None);
    assert_success(&again);
    assert!(!text(&again).contains("bad file"), "{}", text(&again));
    assert_eq!(
        bad_checksums(&scratch.lake()).await,
        before,
        "no second record"
    );
    assert_eq!(bronze_version(&scratch), bronze);
}

#[tokio::test]
async fn a_touched_file_is_read_once_then_known_by_its_new_time() {
    let scratch = Scratch::new();
    scratch.generate(200, 3, 2, 79);
    assert_success(&scratch.run());
    let (file, _) = ledger(&scratch.lake())
        .await
        .first()
        .expect("a landed file")
        .clone();
    let path = scratch.transactions_dir().join(&file);
    let modified_micros = |path: &Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .modified()
            .expect("mtime")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_micros() as i64
    };
    let recorded_time = |lake: std::path::PathBuf, file: String| async move {
        query(
            &lake,
            &["_medallion.ingested_files"],
            &format!(
                "SELECT modified_micros FROM _medallion.ingested_files \
                 WHERE source = 'transactions' AND file = '{file}'"
            ),
        )
        .await
    };
    let bronze = bronze_version(&scratch);

    // Touched: read once, found the same, and known by its new time from then on.
    touch(&path);
    let touched_at = modified_micros(&path);
    assert_success(&scratch.run());
    assert_eq!(bronze_version(&scratch), bronze, "nothing landed");
    assert_eq!(
        recorded_time(scratch.lake(), file.clone()).await,
        [[touched_at.to_string()]]
    );

    // Touched again just now: read, found the same, but the time is not recorded, as bytes written
    // within the same clock tick could hide behind it.
    set_modified(&path, std::time::SystemTime::now());
    assert_success(&scratch.run());
    assert_eq!(bronze_version(&scratch), bronze);
    assert_eq!(
        recorded_time(scratch.lake(), file.clone()).await,
        [[touched_at.to_string()]]
    );

    // Other bytes of the same size under the recorded time are not read: the ledger knows the file by
    // its size and time. (Read, they would stop the ingest as a rewritten file.)
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 2;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    std::fs::write(&path, &bytes).expect("rewrite");
    set_modified(
        &path,
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(touched_at as u64),
    );
    assert_eq!(modified_micros(&path), touched_at);
    assert_success(&scratch.run());
    assert_eq!(bronze_version(&scratch), bronze);
}
