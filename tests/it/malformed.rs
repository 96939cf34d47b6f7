//! Bad landing rows: the run fails cleanly, the error names file, row and column, and no table is left
//! half-written. Fixing the file and running again converges.

use crate::common::{Scratch, assert_success, delta_version, file_name, query, text};

/// Replaces data row `row` (1-based, after the header) of a CSV file with `edit(row_text)`.
fn edit_row(path: &std::path::Path, row: usize, edit: impl Fn(&str) -> String) {
    let content = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = content.lines().map(String::from).collect();
    lines[row] = edit(&lines[row]);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn versions(scratch: &Scratch) -> Vec<Option<u64>> {
    [
        "bronze/transactions",
        "silver/transactions",
        "gold/daily_kpis",
        "gold/fact_transactions",
    ]
    .iter()
    .map(|t| delta_version(&scratch.lake().join(t)))
    .collect()
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

    // 2. An amount that does not parse: Bronze keeps the raw row, Silver and Gold are untouched.
    let (aside, original) = &held[1];
    std::fs::rename(aside, original).unwrap();
    edit_row(original, 3, |line| {
        let mut fields: Vec<String> = line.split(',').map(String::from).collect();
        fields[6] = "$12.x4".into();
        fields.join(",")
    });
    let output = scratch.run();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let message = text(&output);
    let name = file_name(original);
    assert!(
        message.contains(&format!(
            "file `{name}` row 3 column `amount` (raw value `$12.x4`)"
        )),
        "{message}"
    );
    let failed = versions(&scratch);
    assert_eq!(
        failed[0],
        fixed[0].map(|v| v + 1),
        "Bronze landed the raw rows"
    );
    assert_eq!(failed[1..], fixed[1..], "Silver and Gold unchanged");

    // Running again without a fix fails the same way (the bad rows are not skipped silently).
    let output = scratch.run();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(versions(&scratch)[1..], fixed[1..]);

    let rows = query(
        &scratch.lake(),
        &["silver.transactions"],
        &format!("SELECT COUNT(*) FROM silver.transactions WHERE _source_file = '{name}'"),
    )
    .await;
    assert_eq!(
        rows,
        vec![vec!["0".to_string()]],
        "no row of the bad file reached Silver"
    );
}
