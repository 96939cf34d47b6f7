//! Bad landing rows: a row that cannot be read fails the run cleanly, naming file, row and column, with no
//! table half-written; a row that reads but does not type goes to quarantine with its reason.

use crate::common::{Scratch, assert_success, file_name, query, text};

/// Replaces data row `row` (1-based, after the header) of a CSV file with `edit(row_text)`.
fn edit_row(path: &std::path::Path, row: usize, edit: impl Fn(&str) -> String) {
    let content = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = content.lines().map(String::from).collect();
    lines[row] = edit(&lines[row]);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn versions(scratch: &Scratch) -> Vec<Option<u64>> {
    scratch.versions(&[
        "bronze/transactions",
        "silver/transactions",
        "gold/daily_kpis",
        "gold/fact_transactions",
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_rows_fail_cleanly_and_name_file_row_and_column() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 10, 4, 3);
    let held = scratch.hold_back_changes(2);
    assert_success(&scratch.run());
    let clean = versions(&scratch);

    // 1. A row with a missing field: nothing is committed anywhere, the error says where.
    let (aside, original) = &held[0];
    let good = std::fs::read(aside).unwrap();
    std::fs::rename(aside, original).unwrap();
    edit_row(original, 5, |line| {
        line.rsplit_once(',')
            .map(|(head, _)| head)
            .unwrap_or("")
            .to_string()
    });
    let output = scratch.run();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let message = text(&output);
    let name = file_name(original);
    assert!(
        message.contains(&format!(
            "landing file `{name}` row 5 column `errors`: expected 14 fields, found 13"
        )),
        "{message}"
    );
    assert_eq!(versions(&scratch), clean, "no table changed");
    assert!(
        message.contains("skipped"),
        "downstream stages are reported skipped: {message}"
    );

    // Fixing the file lands it on the next run.
    std::fs::write(original, &good).unwrap();
    assert_success(&scratch.run());
    let fixed = versions(&scratch);
    assert_eq!(fixed[0], clean[0].map(|v| v + 1));

    // 2. Rows that do not type (an amount that does not parse, an unknown channel, a missing key) go to
    // quarantine with their reason and raw values; the good rows of the same file reach Silver.
    let (aside, original) = &held[1];
    std::fs::rename(aside, original).unwrap();
    let set = |row: usize, index: usize, value: &'static str| {
        edit_row(original, row, move |line| {
            let mut fields: Vec<String> = line.split(',').map(String::from).collect();
            fields[index] = value.into();
            fields.join(",")
        })
    };
    set(3, 6, "$12.x4");
    set(4, 7, "Telepathy");
    set(6, 2, "");
    let output = scratch.run();
    assert_success(&output);
    let message = text(&output);
    assert!(
        message.contains("3 row(s) quarantined to `quarantine.transactions`"),
        "{message}"
    );
    let name = file_name(original);
    let quarantined = query(
        &scratch.lake(),
        &["quarantine.transactions"],
        &format!(
            "SELECT _source_row, _reason, COALESCE(id, ''), amount, use_chip FROM quarantine.transactions \
             WHERE _source_file = '{name}' ORDER BY _source_row"
        ),
    )
    .await;
    assert_eq!(quarantined.len(), 3, "{quarantined:?}");
    assert_eq!(quarantined[0][..2], ["3", "amount_parses"]);
    assert_eq!(quarantined[0][3], "$12.x4", "raw value kept");
    assert_eq!(quarantined[1][..2], ["4", "channel_known"]);
    assert_eq!(quarantined[1][4], "Telepathy");
    assert_eq!(quarantined[2][..3], ["6", "dms_id_present", ""]);
    let reached = query(
        &scratch.lake(),
        &["silver.transactions"],
        &format!(
            "SELECT COUNT(*) FROM silver.transactions WHERE _source_file = '{name}' AND _source_row IN (3, 4, 6)"
        ),
    )
    .await;
    assert_eq!(
        reached,
        vec![vec!["0".to_string()]],
        "no quarantined row reached Silver"
    );
    let good = query(
        &scratch.lake(),
        &["silver.transactions"],
        &format!("SELECT COUNT(*) > 0 FROM silver.transactions WHERE _source_file = '{name}'"),
    )
    .await;
    assert_eq!(
        good,
        vec![vec!["true".to_string()]],
        "the good rows of the file reached Silver"
    );
    let accounting = query(
        &scratch.lake(),
        &["_medallion.check_runs"],
        "SELECT outcome, observed FROM _medallion.check_runs WHERE check_name = 'rows_accounted' \
         ORDER BY recorded_at DESC LIMIT 1",
    )
    .await;
    assert_eq!(accounting[0][0], "passed", "{accounting:?}");
    assert!(accounting[0][1].contains("3 quarantined"), "{accounting:?}");

    // Running again quarantines nothing twice.
    assert_success(&scratch.run());
    let again = query(
        &scratch.lake(),
        &["quarantine.transactions"],
        "SELECT COUNT(*) FROM quarantine.transactions",
    )
    .await;
    assert_eq!(again, vec![vec!["3".to_string()]]);
}
