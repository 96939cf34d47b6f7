//! Resource limits: a run whose memory limit is too small for a stage fails that stage with a clear
//! error and writes nothing, and a disk that fills up during a run leaves every table at its previous
//! version; with the resource back, the next run converges to the clean result.

use std::process::Command;

use crate::common::{BIN, Scratch, assert_success, delta_version, query, repo, text};

const TABLES: [&str; 4] = [
    "bronze/transactions",
    "silver/transactions",
    "gold/daily_kpis",
    "gold/fact_transactions",
];

async fn silver_and_kpis(lake: &std::path::Path) -> Vec<Vec<String>> {
    query(
        lake,
        &["silver.transactions", "gold.daily_kpis"],
        "SELECT COUNT(*), CAST(SUM(amount) AS VARCHAR), (SELECT CAST(SUM(total_amount) AS VARCHAR) FROM gold.daily_kpis) \
         FROM silver.transactions",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_limit_too_small_for_a_stage_fails_it_clearly_and_writes_nothing() {
    let scratch = Scratch::new();
    scratch.generate(4_000, 12, 3, 17);
    let tight = scratch.command(&["run", "--memory-limit", "4M", "pipelines/transactions.yaml"]);
    assert_eq!(tight.status.code(), Some(1), "{}", text(&tight));
    let output = text(&tight);
    assert!(output.contains("Resources exhausted"), "{output}");
    assert!(
        output.contains("needs more than the 4 MiB of `--memory-limit`"),
        "{output}"
    );
    let lake = scratch.lake();
    assert_eq!(
        delta_version(&lake.join("silver/transactions")),
        None,
        "the stage that ran out wrote nothing"
    );
    // With room (also through the environment), the same lake converges to a clean run.
    let roomy = Command::new(BIN)
        .args(["run", "pipelines/transactions.yaml"])
        .current_dir(repo())
        .env("MEDALLION_LANDING", scratch.landing())
        .env("MEDALLION_LAKE", &lake)
        .env("MEDALLION_MEMORY_LIMIT", "256M")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run");
    assert_success(&roomy);
    let clean = Scratch::new();
    std::fs::rename(scratch.landing(), clean.landing()).expect("move landing");
    assert_success(&clean.run());
    assert_eq!(
        silver_and_kpis(&lake).await,
        silver_and_kpis(&clean.lake()).await
    );
}

/// A small tmpfs mounted for the lake, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// `None` where this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(path: std::path::PathBuf, megabytes: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .output()
            .ok()?;
        mounted.status.success().then_some(SmallDisk { path })
    }

    /// Fills the disk up to `leave` free bytes with a file that [`SmallDisk::free`] removes.
    fn fill(&self, leave: u64) {
        let output = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .expect("df");
        let available: u64 = String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df avail");
        let size = available.saturating_sub(leave) as usize;
        std::fs::write(self.path.join("filler"), vec![0u8; size]).expect("filler");
    }

    fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_leaves_every_table_at_its_previous_version_and_the_next_run_converges() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 12, 4, 23);
    let held = scratch.hold_back_changes(3);
    let Some(disk) = SmallDisk::mount(scratch.dir.path().join("disk"), 64) else {
        eprintln!("skipped: this machine does not let the test mount a tmpfs (needs root)");
        return;
    };
    let lake = disk.path.join("lake");
    let run = || {
        Command::new(BIN)
            .args(["run", "pipelines/transactions.yaml"])
            .current_dir(repo())
            .env("MEDALLION_LANDING", scratch.landing())
            .env("MEDALLION_LAKE", &lake)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run")
    };
    assert_success(&run());
    let before: Vec<_> = TABLES
        .iter()
        .map(|t| delta_version(&lake.join(t)))
        .collect();
    let contents = silver_and_kpis(&lake).await;

    // New change files arrive while the disk has almost no room left.
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("deliver");
    }
    disk.fill(24 * 1024);
    let full = run();
    assert_ne!(full.status.code(), Some(0), "{}", text(&full));
    assert!(
        text(&full).contains("No space left on device"),
        "{}",
        text(&full)
    );
    disk.free();
    let after: Vec<_> = TABLES
        .iter()
        .map(|t| delta_version(&lake.join(t)))
        .collect();
    assert_eq!(after, before, "no table moved past its last commit");
    assert_eq!(
        silver_and_kpis(&lake).await,
        contents,
        "and each reads as before"
    );

    // Room again: the next run lands the new files and equals one clean run over all of them.
    assert_success(&run());
    assert_success(&scratch.run());
    assert_eq!(
        silver_and_kpis(&lake).await,
        silver_and_kpis(&scratch.lake()).await
    );
}
