//! Randomized robustness of the parsers that see untrusted input: the money, zip, date and card UDFs, the
//! pipeline YAML loader and the landing file reader get arbitrary input and must answer (a value, `None`
//! or an error) without panicking. Properties where they exist: money round-trips to the cent.
//! `PROPTEST_CASES` raises the number of cases (e.g. `PROPTEST_CASES=200000 bash .ci/test robustness`).

use std::collections::BTreeMap;

use medallion::engine::udf::{
    card_last4, parse_channel, parse_money, parse_month, parse_ts, parse_zip,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
    ))]

    #[test]
    fn udfs_never_panic(text in ".{0,40}") {
        let _ = parse_money(&text);
        let _ = parse_zip(&text);
        let _ = parse_ts(&text);
        let _ = parse_month(&text);
        let _ = card_last4(&text);
        let _ = parse_channel(&text);
    }

    #[test]
    fn money_round_trips_to_the_cent(cents in -999_999_999_999_999_999i128..=999_999_999_999_999_999i128) {
        let sign = if cents < 0 { "-" } else { "" };
        let text = format!("${sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100);
        prop_assert_eq!(parse_money(&text), Some(cents));
    }

    #[test]
    fn the_yaml_loader_reports_instead_of_panicking(text in "[ -~\n]{0,300}") {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, &text).expect("write");
        let _ = medallion::config::load_with_env(&file, |_| None, &BTreeMap::new());
    }

    #[test]
    fn the_landing_reader_reports_instead_of_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..400), header in any::<bool>()) {
        let dir = tempfile::tempdir().expect("dir");
        let landing = dir.path().join("t");
        std::fs::create_dir_all(&landing).expect("dir");
        let mut content = if header { b"Op,dms_commit_ts,id,val\n".to_vec() } else { Vec::new() };
        content.extend(bytes);
        std::fs::write(landing.join("20200101-0000000001.csv"), &content).expect("write");
        let source = medallion::config::Source {
            name: "t".into(),
            path: medallion::storage::Location::local(&landing),
            format: medallion::config::FileFormat::Csv,
            header,
            delimiter: b',',
            columns: vec!["id".into(), "val".into()],
            key: vec!["id".into()],
            dms: Some(medallion::config::DmsLayout {
                timestamp_column: Some("dms_commit_ts".into()),
                include_op_for_full_load: false,
                change_seq: false,
            }),
            on_bad_file: medallion::config::BadFilePolicy::Fail,
        };
        let layout = medallion::landing::BronzeLayout::new(&source);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        for file in runtime.block_on(medallion::landing::discover(&source)).expect("discover") {
            let lineage = medallion::landing::Lineage { run_id: "r".into(), batch_id: 0, ingested_at_micros: 0 };
            if let Ok(mut batches) = medallion::landing::FileBatches::open(&layout, &file, lineage, 64) {
                for batch in batches.by_ref() {
                    if batch.is_err() {
                        break;
                    }
                }
            }
        }
    }
}
