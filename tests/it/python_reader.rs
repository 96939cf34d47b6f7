//! Gold is readable by Python `deltalake` (the README's example), in a real interpreter.

use std::process::Command;

use crate::common::{Scratch, assert_success, python, query};

const SCRIPT: &str = r#"
import os, sys
try:
    from deltalake import DeltaTable
    lake = sys.argv[1]
    kpis = DeltaTable(os.path.join(lake, "gold", "daily_kpis")).to_pyarrow_table()
    print(kpis.num_rows, sum(kpis.column("txn_count").to_pylist()), sum(kpis.column("total_amount").to_pylist()))
    print(kpis.schema.field("total_amount").type, kpis.schema.field("txn_date").type)
    sys.stdout.flush()
    os._exit(0)
except Exception as error:
    print(error, file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn python_deltalake_reads_gold_daily_kpis() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 12, 3, 5);
    assert_success(&scratch.run());
    let output = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(scratch.lake())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = query(
        &scratch.lake(),
        &["silver.transactions", "gold.daily_kpis"],
        "SELECT (SELECT COUNT(*) FROM gold.daily_kpis) AS a, (SELECT COUNT(*) FROM silver.transactions) AS b, \
         CAST((SELECT SUM(amount) FROM silver.transactions) AS VARCHAR) AS c",
    )
    .await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        expected[0].join(" "),
        "rows, sum(txn_count), sum(total_amount) as Python sees them"
    );
    assert_eq!(lines[1], "decimal128(18, 2) date32[day]");
}
