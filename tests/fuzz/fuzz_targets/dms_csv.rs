//! The landing reader on arbitrary bytes as a DMS CSV file: the first byte picks the layout (header or
//! not, full-load or change file, `Op` in the full load, change sequence, delimiter, gzip); every row
//! ends as a batch or as an error naming the file, row and column, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medallion::{
    config::{BadFilePolicy, DmsLayout, FileFormat, Source},
    landing::{Compression, FileBatches, FileKind, Input, LandingFile, Lineage},
    storage::Location,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, content)) = data.split_first() else {
        return;
    };
    let bit = |n: u8| flags & (1 << n) != 0;
    let source = Source {
        name: "transactions".into(),
        path: Location::local("/nonexistent"),
        format: FileFormat::Csv,
        header: bit(0),
        delimiter: if bit(5) { b'|' } else { b',' },
        columns: [
            "id", "date", "client_id", "card_id", "amount", "use_chip", "merchant_id",
            "merchant_city", "merchant_state", "zip", "mcc", "errors",
        ]
        .map(String::from)
        .to_vec(),
        key: vec!["id".into()],
        dms: Some(DmsLayout {
            timestamp_column: bit(1).then(|| "dms_commit_ts".to_string()),
            include_op_for_full_load: bit(2),
            change_seq: bit(3),
        }),
        on_bad_file: BadFilePolicy::Fail,
    };
    let file = LandingFile {
        path: Location::local("/nonexistent/20200101-0000000001.csv"),
        relative: "20200101-0000000001.csv".into(),
        kind: if bit(4) { FileKind::FullLoad } else { FileKind::Change },
        format: FileFormat::Csv,
        compression: if bit(6) { Compression::Gzip } else { Compression::None },
        size: content.len() as u64,
        modified_micros: 0,
    };
    let layout = medallion::landing::BronzeLayout::new(&source);
    let lineage = Lineage {
        run_id: "fuzz".into(),
        batch_id: 1,
        ingested_at_micros: 0,
    };
    let input = Input::Bytes(bytes::Bytes::copy_from_slice(content));
    let Ok(mut batches) = FileBatches::from_input(&layout, &file, lineage, 7, input) else {
        return;
    };
    let mut rows = 0;
    for batch in batches.by_ref() {
        match batch {
            Ok(batch) => rows += batch.num_rows() as u64,
            Err(error) => {
                let _ = error.to_string();
                return;
            }
        }
    }
    assert_eq!(rows, batches.rows(), "every row read is counted once");
});
