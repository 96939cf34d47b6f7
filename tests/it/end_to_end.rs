//! The reference pipeline end to end: contract tables, numbers against an independent replay, idempotent
//! re-runs, and incremental runs that apply only new files.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::common::{
    Scratch, assert_success, codecs, daily, delta_version, query, replay, schema, walk,
};

const CONTRACT_TABLES: [(&str, &str); 15] = [
    ("bronze", "transactions"),
    ("bronze", "cards"),
    ("bronze", "users"),
    ("bronze", "mcc_codes"),
    ("silver", "transactions"),
    ("silver", "cards"),
    ("silver", "users"),
    ("silver", "mcc_codes"),
    ("gold", "daily_kpis"),
    ("gold", "merchant_daily"),
    ("gold", "fact_transactions"),
    ("gold", "dim_card"),
    ("gold", "dim_user"),
    ("gold", "dim_merchant"),
    ("gold", "dim_date"),
];

/// Checks silver/transactions and gold/daily_kpis against a replay of every file in the landing folder.
async fn assert_matches_replay(scratch: &Scratch) {
    let live = replay(&scratch.transactions_dir());
    let expected = daily(&live);
    let lake = scratch.lake();

    let silver = query(
        &lake,
        &["silver.transactions"],
        "SELECT COUNT(*) AS n, COUNT(DISTINCT dms_id) AS k, CAST(SUM(amount) AS VARCHAR) AS s FROM silver.transactions",
    )
    .await;
    let total: Decimal = live.values().map(|t| t.amount).sum();
    assert_eq!(
        silver,
        vec![vec![
            live.len().to_string(),
            live.len().to_string(),
            total.to_string()
        ]],
        "silver/transactions: rows, distinct keys, sum(amount)"
    );

    let ids = query(
        &lake,
        &["silver.transactions"],
        "SELECT dms_id FROM silver.transactions ORDER BY dms_id",
    )
    .await;
    let ids: Vec<String> = ids.into_iter().map(|r| r[0].clone()).collect();
    let want: Vec<String> = live.keys().map(|k| k.to_string()).collect();
    assert_eq!(ids, want, "silver/transactions holds exactly the live keys");

    let kpis = query(
        &lake,
        &["gold.daily_kpis"],
        "SELECT CAST(txn_date AS VARCHAR) AS d, txn_count, CAST(total_amount AS VARCHAR) AS t, refund_count, online_count, error_count \
         FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    let want: Vec<Vec<String>> = expected
        .iter()
        .map(|(date, (count, sum, refunds, online, errors))| {
            vec![
                date.clone(),
                count.to_string(),
                sum.to_string(),
                refunds.to_string(),
                online.to_string(),
                errors.to_string(),
            ]
        })
        .collect();
    assert_eq!(kpis, want, "gold/daily_kpis per date");

    let totals = query(
        &lake,
        &["gold.daily_kpis", "silver.transactions"],
        "SELECT (SELECT SUM(txn_count) FROM gold.daily_kpis) AS a, (SELECT COUNT(*) FROM silver.transactions) AS b, \
                CAST((SELECT SUM(total_amount) FROM gold.daily_kpis) AS VARCHAR) AS c, \
                CAST((SELECT SUM(amount) FROM silver.transactions) AS VARCHAR) AS d",
    )
    .await;
    assert_eq!(totals[0][0], totals[0][1], "sum(txn_count) = silver rows");
    assert_eq!(
        totals[0][2], totals[0][3],
        "sum(total_amount) = sum(amount) to the cent"
    );
}

fn versions(scratch: &Scratch) -> BTreeMap<String, Option<u64>> {
    CONTRACT_TABLES
        .iter()
        .map(|(layer, name)| {
            (
                format!("{layer}/{name}"),
                delta_version(&scratch.table(layer, name)),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_pipeline_matches_an_independent_replay_and_is_incremental() {
    let scratch = Scratch::new();
    scratch.generate(6_000, 20, 6, 7);
    let held = scratch.hold_back_changes(2);

    // First run: every contract table, numbers equal to the replay of the files present.
    let first = scratch.run();
    assert_success(&first);
    for (layer, name) in CONTRACT_TABLES {
        assert!(
            delta_version(&scratch.table(layer, name)).is_some(),
            "{layer}/{name} is a Delta table after the first run"
        );
    }
    assert!(delta_version(&scratch.lake().join("_medallion").join("runs")).is_some());
    assert_matches_replay(&scratch).await;

    // Second run, no new files: no commit to any Silver or Gold table, exit 0.
    let before = versions(&scratch);
    let again = scratch.run();
    assert_success(&again);
    assert_eq!(
        versions(&scratch),
        before,
        "a run without new files commits nothing"
    );

    // The next change files arrive: only they are landed and applied.
    let bronze_before = query(
        &scratch.lake(),
        &["bronze.transactions"],
        "SELECT COUNT(*) FROM bronze.transactions",
    )
    .await[0][0]
        .parse::<u64>()
        .unwrap();
    let mut new_rows = 0u64;
    for (aside, original) in &held {
        new_rows += csv::Reader::from_path(aside).unwrap().records().count() as u64;
        std::fs::rename(aside, original).unwrap();
    }
    let third = scratch.run();
    assert_success(&third);
    let after = versions(&scratch);
    assert_eq!(
        after["bronze/transactions"],
        before["bronze/transactions"].map(|v| v + 1),
        "one Bronze commit for the new files"
    );
    assert_eq!(
        after["bronze/cards"], before["bronze/cards"],
        "cards had no new files"
    );
    assert_eq!(
        after["silver/cards"], before["silver/cards"],
        "silver/cards inputs unchanged"
    );
    assert_eq!(
        after["silver/transactions"],
        before["silver/transactions"].map(|v| v + 1)
    );
    let landed = query(
        &scratch.lake(),
        &["bronze.transactions"],
        "SELECT COUNT(*) AS n, COUNT(DISTINCT _source_file) AS f FROM bronze.transactions \
         WHERE _batch_id = (SELECT MAX(_batch_id) FROM bronze.transactions)",
    )
    .await;
    assert_eq!(
        landed,
        vec![vec![new_rows.to_string(), held.len().to_string()]]
    );
    let bronze_after = query(
        &scratch.lake(),
        &["bronze.transactions"],
        "SELECT COUNT(*) FROM bronze.transactions",
    )
    .await[0][0]
        .parse::<u64>()
        .unwrap();
    assert_eq!(
        bronze_after,
        bronze_before + new_rows,
        "nothing landed twice"
    );
    // The Silver stage read only the new change rows.
    let summary = String::from_utf8_lossy(&third.stdout).to_string();
    let silver_line = summary
        .lines()
        .find(|l| l.trim_start().starts_with("silver_transactions"))
        .unwrap_or_default();
    let read: Vec<&str> = silver_line.split_whitespace().collect();
    assert_eq!(
        read.get(2),
        Some(&new_rows.to_string().as_str()),
        "{silver_line}"
    );
    assert_matches_replay(&scratch).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_tables_have_the_contract_types() {
    let scratch = Scratch::new();
    scratch.generate(1_500, 10, 2, 11);
    assert_success(&scratch.run());
    let silver = schema(&scratch.table("silver", "transactions")).await;
    for column in [
        "dms_id: Int64",
        "txn_ts: Timestamp(µs)",
        "txn_date: Date32",
        "client_id: Int64",
        "card_id: Int64",
        "merchant_id: Int64",
        "amount: Decimal128(18, 2)",
        "channel: Utf8",
        "merchant_city: Utf8",
        "merchant_state: Utf8",
        "zip: Utf8",
        "mcc: Int32",
        "errors: Utf8",
        "is_refund: Boolean",
        "amount_category: Utf8",
        "_commit_ts: Timestamp(µs)",
        "_source_file: Utf8",
    ] {
        assert!(
            silver
                .iter()
                .any(|c| c.replace("Utf8View", "Utf8") == column),
            "silver/transactions lacks `{column}`: {silver:?}"
        );
    }
    let kpis = schema(&scratch.table("gold", "daily_kpis")).await;
    let kpis: Vec<String> = kpis.iter().map(|c| c.replace("Utf8View", "Utf8")).collect();
    assert_eq!(
        kpis,
        [
            "txn_date: Date32",
            "txn_count: Int64",
            "total_amount: Decimal128(18, 2)",
            "refund_count: Int64",
            "refund_amount: Decimal128(18, 2)",
            "error_count: Int64",
            "online_count: Int64",
            "distinct_cards: Int64",
        ]
    );
    // Typing rules of the contract, on real rows.
    let rules = query(
        &scratch.lake(),
        &["silver.transactions", "silver.cards"],
        "SELECT \
           (SELECT COUNT(*) FROM silver.transactions WHERE zip IS NOT NULL AND length(zip) <> 5) AS r1, \
           (SELECT COUNT(*) FROM silver.transactions WHERE channel NOT IN ('SWIPE', 'CHIP', 'ONLINE')) AS r2, \
           (SELECT COUNT(*) FROM silver.transactions WHERE channel = 'ONLINE' AND (merchant_state IS NOT NULL OR zip IS NOT NULL)) AS r3, \
           (SELECT COUNT(*) FROM silver.transactions WHERE is_refund <> (amount < 0)) AS r4, \
           (SELECT COUNT(*) FROM silver.transactions WHERE amount_category <> CASE WHEN abs(amount) >= 1000 THEN 'high_value' WHEN abs(amount) >= 100 THEN 'medium_value' ELSE 'standard' END) AS r5, \
           (SELECT COUNT(*) FROM silver.transactions WHERE errors = '') AS r6, \
           (SELECT COUNT(*) FROM silver.cards WHERE length(card_last4) <> 4) AS r7",
    )
    .await;
    assert_eq!(rules, vec![vec!["0"; 7]]);
    // Sensitive card data never reaches Silver.
    let cards = schema(&scratch.table("silver", "cards")).await;
    assert!(
        !cards
            .iter()
            .any(|c| c.starts_with("cvv") || c.starts_with("card_number")),
        "{cards:?}"
    );
}

/// A change batch whose updates touch hundreds of scattered dates: Gold is rebuilt in full instead of
/// through a predicate of hundreds of terms (3,650 dates used to overflow the stack), and still equals
/// the replay.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_touching_hundreds_of_scattered_dates_rebuilds_gold_in_full() {
    let scratch = Scratch::new();
    scratch.generate_with_batch(4_000, 2_000, 0, 11, 1_500);
    assert_success(&scratch.run());
    assert_matches_replay(&scratch).await;
    let gold_before = delta_version(&scratch.table("gold", "daily_kpis"));

    scratch.deliver_batch();
    let second = scratch.run();
    assert_success(&second);
    let report = crate::common::text(&second);
    assert!(
        report.contains("`txn_date` values touched: rebuilt in full"),
        "the report says why Gold was rebuilt whole:\n{report}"
    );
    assert_eq!(
        delta_version(&scratch.table("gold", "daily_kpis")),
        gold_before.map(|v| v + 1),
        "one new Gold version"
    );
    assert_matches_replay(&scratch).await;
}

/// Gold's whole tables in a comparable form: every row of daily_kpis and merchant_daily, in order.
async fn gold_aggregates(scratch: &Scratch) -> Vec<Vec<String>> {
    let mut rows = query(
        &scratch.lake(),
        &["gold.daily_kpis"],
        "SELECT * FROM gold.daily_kpis ORDER BY txn_date",
    )
    .await;
    rows.extend(
        query(
            &scratch.lake(),
            &["gold.merchant_daily"],
            "SELECT * FROM gold.merchant_daily ORDER BY txn_date, merchant_id",
        )
        .await,
    );
    rows
}

/// Whole rebuilds of the aggregating Gold stages computed one range of `txn_date` at a time (small
/// slices here, to get many) give the same tables as computed at once: on the first run and on a
/// batch over hundreds of dates. The fact, which holds no state, is computed at once.
#[tokio::test(flavor = "multi_thread")]
async fn aggregations_rebuilt_in_slices_of_dates_equal_those_computed_at_once() {
    let sliced = Scratch::new();
    let whole = Scratch::new();
    for scratch in [&sliced, &whole] {
        scratch.generate_with_batch(4_000, 2_000, 0, 11, 1_500);
    }
    let run = |scratch: &Scratch, slice_rows: &str| {
        let output = scratch.command(&[
            "run",
            "pipelines/transactions.yaml",
            "--slice-rows",
            slice_rows,
        ]);
        assert_success(&output);
        crate::common::text(&output)
    };
    let slices_of = |report: &str, stage: &str| -> Option<u64> {
        let line = report
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{stage} ")))?;
        let (_, after) = line.split_once("computed in ")?;
        after.split_whitespace().next()?.parse().ok()
    };
    for delivered in [false, true] {
        if delivered {
            sliced.deliver_batch();
            whole.deliver_batch();
        }
        let report = run(&sliced, "500");
        for stage in ["gold_daily_kpis", "gold_merchant_daily"] {
            let slices = slices_of(&report, stage);
            assert!(
                slices.is_some_and(|n| n >= 4),
                "{stage} is computed in slices of 500 rows of its source:\n{report}"
            );
        }
        assert_eq!(
            slices_of(&report, "gold_fact_transactions"),
            None,
            "a projection holds no state and runs at once:\n{report}"
        );
        let report = run(&whole, "0");
        assert!(!report.contains("slices"), "{report}");
        assert_eq!(
            gold_aggregates(&sliced).await,
            gold_aggregates(&whole).await
        );
        assert_matches_replay(&sliced).await;
    }
}

/// A stage without checks is computed in slices too (it is written and committed without the copy
/// the checks read): merchant_daily without its reconciliation, rebuilt in full after a batch over
/// hundreds of dates, equals the same table computed at once.
#[tokio::test(flavor = "multi_thread")]
async fn an_aggregation_without_checks_is_rebuilt_in_slices_too() {
    let without_checks = |yaml: String| {
        let checks = "    incremental: { column: txn_date, source: silver.transactions }\n    checks:\n      \
                      - name: total_amount_matches_silver\n        \
                      query: SELECT COALESCE(SUM(total_amount), 0) FROM candidate\n        \
                      equals: SELECT COALESCE(SUM(amount), 0) FROM silver.transactions\n  - name: gold_fact_transactions";
        assert!(yaml.contains(checks), "the reference YAML changed");
        yaml.replace(
            checks,
            "    incremental: { column: txn_date, source: silver.transactions }\n  - name: gold_fact_transactions",
        )
    };
    let sliced = Scratch::new();
    let whole = Scratch::new();
    for scratch in [&sliced, &whole] {
        scratch.generate_with_batch(4_000, 2_000, 0, 11, 1_500);
        assert_success(&scratch.run_edited(&without_checks, None));
        scratch.deliver_batch();
    }
    let project = |scratch: &Scratch| scratch.dir.path().join("project");
    let run = |scratch: &Scratch, slice_rows: &str| {
        let output = scratch.command_in(
            &project(scratch),
            &["run", "pipelines/t.yaml", "--slice-rows", slice_rows],
        );
        assert_success(&output);
        crate::common::text(&output)
    };
    let report = run(&sliced, "500");
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("gold_merchant_daily "))
        .unwrap_or_default();
    assert!(
        line.contains("rebuilt in full") && line.contains("slices of `txn_date`"),
        "{report}"
    );
    run(&whole, "0");
    assert_eq!(
        gold_aggregates(&sliced).await,
        gold_aggregates(&whole).await
    );
    assert_matches_replay(&sliced).await;
}

/// The statistics columns of a table's Delta properties and, from its first data file, the Parquet
/// columns that have min and max.
fn statistics(table: &std::path::Path) -> (Option<String>, Vec<String>) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let log = std::fs::read_to_string(table.join("_delta_log/00000000000000000000.json")).unwrap();
    let mut property = None;
    for line in log.lines() {
        let action: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(columns) =
            action["metaData"]["configuration"]["delta.dataSkippingStatsColumns"].as_str()
        {
            property = Some(columns.to_string());
        }
    }
    let file = walk(table)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .expect("a data file");
    let footer = SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let group = footer.metadata().row_group(0);
    let with_stats = (0..group.num_columns())
        .filter(|&i| {
            group
                .column(i)
                .statistics()
                .is_some_and(|s| s.min_bytes_opt().is_some())
        })
        .map(|i| group.column(i).column_path().string())
        .collect();
    (property, with_stats)
}

/// Bronze is written with snappy and the other layers with zstd level 1 unless a stage names its
/// `compression`, which the table keeps (a later change of the YAML is noted, not applied); every
/// reader reads each codec back; a codec some Delta readers lack is refused by `validate`.
#[tokio::test(flavor = "multi_thread")]
async fn each_table_keeps_the_compression_it_was_created_with() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 20, 2, 5);
    let fact = "    target: gold.fact_transactions\n";
    let with_codec = |codec: &'static str| {
        move |yaml: String| {
            assert!(yaml.contains(fact), "the reference YAML changed");
            yaml.replacen(fact, &format!("{fact}    compression: {codec}\n"), 1)
        }
    };
    let held = scratch.hold_back_changes(1);
    assert_success(&scratch.run_edited(&with_codec("LZ4"), None));
    let one = |codec: &str| std::collections::BTreeSet::from([codec.to_string()]);
    assert_eq!(
        codecs(&scratch.table("bronze", "transactions")),
        (Some("snappy".to_string()), one("SNAPPY"))
    );
    assert_eq!(
        codecs(&scratch.table("silver", "transactions")),
        (None, one("ZSTD(ZstdLevel(1))"))
    );
    assert_eq!(
        codecs(&scratch.table("gold", "fact_transactions")),
        (Some("lz4_raw".to_string()), one("LZ4_RAW"))
    );
    let counts = query(
        &scratch.lake(),
        &[
            "bronze.transactions",
            "silver.transactions",
            "gold.fact_transactions",
        ],
        "SELECT CAST((SELECT COUNT(*) FROM bronze.transactions) AS VARCHAR) AS b, \
                CAST((SELECT COUNT(*) FROM silver.transactions) AS VARCHAR) AS s, \
                CAST((SELECT COUNT(*) FROM gold.fact_transactions) AS VARCHAR) AS f",
    )
    .await;
    let [bronze, silver, fact] = [0, 1, 2].map(|i| counts[0][i].parse::<u64>().unwrap());
    assert!(
        silver == fact && bronze >= silver && silver > 1_000,
        "{counts:?}"
    );

    // Another codec named later: the run says so, and the table's new files keep its own.
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("restore change file");
    }
    let output = scratch.run_edited(&with_codec("gzip"), None);
    assert_success(&output);
    let text = crate::common::text(&output);
    assert!(
        text.contains(
            "`compression` is gzip(6), the existing table's files are written with lz4_raw"
        ),
        "{text}"
    );
    assert_eq!(
        codecs(&scratch.table("gold", "fact_transactions")),
        (Some("lz4_raw".to_string()), one("LZ4_RAW"))
    );
    assert_eq!(
        codecs(&scratch.table("bronze", "transactions")).1,
        one("SNAPPY")
    );

    // A codec not every Delta reader decodes, or none at all: refused before anything runs.
    for (codec, problem) in [
        ("brotli(3)", "not every Delta reader decodes it"),
        (
            "zip",
            "`zip` is not a compression medallion writes (unknown codec)",
        ),
        ("zstd(", "a level is digits in parentheses"),
        ("zstd(40)", "zstd(40)"),
    ] {
        let output = scratch.command_in(
            &scratch.edit_project(&with_codec(codec), None),
            &["validate", "pipelines/t.yaml"],
        );
        assert_eq!(output.status.code(), Some(2), "{codec}");
        let text = crate::common::text(&output);
        assert!(
            text.contains("stage `gold_fact_transactions`: `compression`")
                && text.contains(problem),
            "{codec}: {text}"
        );
    }
}

/// Bronze keeps statistics for its lineage only, Silver and the fact for the columns the YAML names;
/// queries filtering on the others still answer right; a name that is not a column is an error that
/// says so, a repeated one is refused by `validate`.
#[tokio::test(flavor = "multi_thread")]
async fn statistics_columns_limit_min_and_max_to_the_named_columns() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 20, 2, 5);
    assert_success(&scratch.run());
    let lineage = "_source_file,_file_order,_source_row,_ingested_at,_run_id,_batch_id";
    let (property, with_stats) = statistics(&scratch.table("bronze", "transactions"));
    assert_eq!(property.as_deref(), Some(lineage));
    assert_eq!(with_stats.join(","), lineage);
    let (property, with_stats) = statistics(&scratch.table("silver", "transactions"));
    let named =
        "dms_id,txn_ts,txn_date,client_id,card_id,merchant_id,amount,mcc,is_refund,_commit_ts";
    assert_eq!(property.as_deref(), Some(named));
    let mut expected: Vec<&str> = named.split(',').collect();
    expected.sort();
    let mut got: Vec<&str> = with_stats.iter().map(String::as_str).collect();
    got.sort();
    assert_eq!(got, expected);
    // The fact's statistics leave out its strings (channel, amount_category, errors).
    let (_, with_stats) = statistics(&scratch.table("gold", "fact_transactions"));
    assert!(with_stats.contains(&"amount".to_string()), "{with_stats:?}");
    assert!(
        !with_stats.contains(&"channel".to_string()),
        "{with_stats:?}"
    );

    // Filters on columns with and without statistics agree with the replay.
    let live = replay(&scratch.transactions_dir());
    let online = live.values().filter(|l| l.channel_online).count();
    assert!(online > 0);
    let counted = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*) FROM silver.transactions WHERE channel = 'ONLINE'",
    )
    .await;
    assert_eq!(counted, vec![vec![online.to_string()]]);

    // Naming other columns later does not change the table (the setting applies at creation): the
    // run says so.
    let fewer =
        |yaml: String| yaml.replacen(" mcc, is_refund, _commit_ts]", " is_refund, _commit_ts]", 1);
    let output = scratch.run_edited(&fewer, None);
    assert_success(&output);
    let text = crate::common::text(&output);
    assert!(
        text.contains("`stats_columns` differs from the statistics columns of the existing table (dms_id, txn_ts"),
        "{text}"
    );
    let (property, _) = statistics(&scratch.table("silver", "transactions"));
    assert_eq!(property.as_deref(), Some(named));

    // A column that is not one: the run fails naming it, before any table is created.
    let other = Scratch::new();
    other.generate(200, 5, 0, 5);
    let misnamed =
        |yaml: String| yaml.replacen("stats_columns: [dms_id,", "stats_columns: [dms_idd,", 1);
    let output = other.run_edited(&misnamed, None);
    assert!(!output.status.success());
    let text = crate::common::text(&output);
    assert!(
        text.contains("`stats_columns` names `dms_idd`, which is not a column of the table"),
        "{text}"
    );
    assert!(delta_version(&other.table("silver", "transactions")).is_none());
    let repeated = |yaml: String| {
        yaml.replacen(
            "stats_columns: [dms_id,",
            "stats_columns: [dms_id, dms_id,",
            1,
        )
    };
    let output = other.run_edited(&repeated, None);
    assert_eq!(output.status.code(), Some(2));
    let text = crate::common::text(&output);
    assert!(
        text.contains("`stats_columns` lists `dms_id` twice"),
        "{text}"
    );
}

/// After a batch over the last days, a Gold table rebuilt for those dates is checked on a candidate
/// that reads its files of other dates whole, a sum over them taken file by file, and the
/// reconciliations with Silver (exact, to the cent) still hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_partial_rebuild_is_checked_on_its_untouched_files_read_whole() {
    let scratch = Scratch::new();
    // Over three years: the fact's files of the years before the batch's are left whole, whatever the
    // order its first build wrote its rows in within a year.
    scratch.generate_with_recent_batch(150_000, 1_000, 0, 23, 1_000, 3);
    // A reconciliation of money on the fact, whose files of 1 MiB hold ranges of dates.
    let project = scratch.edit_project(&crate::common::small_files_with_fact_sum, None);
    let run = || {
        let output = scratch.command_in_logging(
            &project,
            &["run", "pipelines/t.yaml"],
            "warn,medallion::runner=debug,medallion::checks=debug",
        );
        assert_success(&output);
        crate::common::text(&output)
    };
    run();
    let partials = scratch.lake().join("_medallion").join("partials");
    assert!(
        std::fs::read_dir(&partials).map(|d| d.count()).unwrap_or(0) > 0,
        "the checks' sums over Silver are kept"
    );
    scratch.deliver_batch();
    let log = run();
    crate::common::assert_fact_checked_on_whole_files(&log);
    // The reconciliations passed (else nothing was published), and the fact equals its SQL.
    let differences = query(
        &scratch.lake(),
        &["silver.transactions", "gold.fact_transactions"],
        "SELECT (SELECT COUNT(*) FROM silver.transactions) - (SELECT COUNT(*) FROM gold.fact_transactions), \
         (SELECT SUM(amount) FROM silver.transactions) - (SELECT SUM(amount) FROM gold.fact_transactions), \
         (SELECT COUNT(*) FROM (SELECT dms_id FROM silver.transactions \
          EXCEPT SELECT transaction_id FROM gold.fact_transactions))",
    )
    .await;
    assert_eq!(
        differences,
        vec![vec!["0".to_string(), "0.00".to_string(), "0".to_string()]]
    );
}
