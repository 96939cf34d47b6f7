//! The lake and the landing files on a real S3-compatible server on 127.0.0.1 (moto's S3 with IAM
//! authentication, serialized so that conditional PUTs are atomic: `tests/servers/s3.py`), reached through
//! a TCP proxy that the tests stop and restart to play an unreachable endpoint.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use medallion::storage::{Location, Storage};

use crate::common::{BIN, Scratch, assert_success, keyed_fact, python, query, repo, text};

/// moto's server with IAM auth, behind a proxy; both stopped when dropped.
struct S3Server {
    child: Child,
    key_id: String,
    secret: String,
    proxy: Proxy,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    fn start() -> S3Server {
        S3Server::start_with(&["--auth"])
    }

    fn start_with(flags: &[&str]) -> S3Server {
        let port = free_port();
        let mut child = Command::new(python())
            .arg(repo().join("tests/servers/s3.py"))
            .arg(port.to_string())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/servers/s3.py (moto from .ci/setup-python.sh)");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("server banner");
        let banner: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("banner `{line}`: {e}"));
        let proxy = Proxy::start(port);
        S3Server {
            child,
            key_id: banner["access_key_id"].as_str().expect("key").to_string(),
            secret: banner["secret_access_key"]
                .as_str()
                .expect("secret")
                .to_string(),
            proxy,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.port)
    }

    /// The environment a user sets for a MinIO-style endpoint.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Storage options for reading the lake from the test itself.
    fn location(&self, url: &str) -> Location {
        let options = BTreeMap::from([
            ("aws_endpoint".to_string(), self.endpoint()),
            ("aws_access_key_id".to_string(), self.key_id.clone()),
            ("aws_secret_access_key".to_string(), self.secret.clone()),
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_allow_http".to_string(), "true".to_string()),
        ]);
        Location::parse(url, Path::new("."), Arc::new(Storage::new(options, false)))
            .expect("location")
    }

    /// Runs a boto3 snippet against the server (`s3` is the client; `argv` the extra arguments).
    fn boto(&self, snippet: &str, args: &[&str]) -> String {
        let script = format!(
            "import sys, os, boto3\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2], \
             aws_secret_access_key=sys.argv[3], region_name='us-east-1')\n\
             argv = sys.argv[4:]\n{snippet}\nsys.stdout.flush()\nos._exit(0)\n"
        );
        let output = Command::new(python())
            .args(["-c", &script, &self.endpoint(), &self.key_id, &self.secret])
            .args(args)
            .output()
            .expect("python");
        assert!(output.status.success(), "boto3: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn create_bucket(&self, name: &str) {
        self.boto("s3.create_bucket(Bucket=argv[0])", &[name]);
    }

    /// Uploads every file under `dir` to `s3://bucket/prefix/`.
    fn upload(&self, dir: &Path, bucket: &str, prefix: &str) {
        self.boto(
            "for root, _, files in os.walk(argv[0]):\n    for f in files:\n        p = os.path.join(root, f)\n        s3.upload_file(p, argv[1], argv[2] + '/' + os.path.relpath(p, argv[0]))",
            &[&dir.to_string_lossy(), bucket, prefix],
        );
    }

    /// Keys under `s3://bucket/prefix`.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.boto(
            "p = s3.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket=argv[0], Prefix=argv[1]):\n    for o in page.get('Contents', []):\n        print(o['Key'])",
            &[bucket, prefix],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// `medallion args...` from the repository with the lake and landing on this server.
    fn medallion(&self, lake: &str, landing: &str, args: &[&str]) -> Output {
        self.medallion_in(&repo(), lake, landing, args, &[])
    }

    fn medallion_in(
        &self,
        dir: &Path,
        lake: &str,
        landing: &str,
        args: &[&str],
        overrides: &[(&str, &str)],
    ) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .current_dir(dir)
            .env("MEDALLION_LAKE", lake)
            .env("MEDALLION_LANDING", landing)
            .env("RUST_LOG", "warn")
            .envs(self.env());
        for (name, value) in overrides {
            command.env(name, value);
        }
        command.output().expect("run medallion")
    }
}

/// A TCP proxy on its own port in front of the server: stopping it makes the endpoint unreachable
/// (connection refused) while the server keeps its data; starting it again on the same port brings it
/// back.
struct Proxy {
    port: u16,
    target: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Bytes the server may still send to clients; past them every connection is cut mid-response.
    /// Negative: no limit.
    budget: Arc<std::sync::atomic::AtomicI64>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let mut proxy = Proxy {
            port: free_port(),
            target,
            stop: None,
            thread: None,
            budget: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
        };
        proxy.resume();
        proxy
    }

    fn resume(&mut self) {
        let (port, target, budget) = (self.port, self.target, self.budget.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, listening) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("proxy bind");
                ready.send(()).expect("ready");
                let serve = async {
                    loop {
                        let Ok((mut client, _)) = listener.accept().await else {
                            continue;
                        };
                        let budget = budget.clone();
                        tokio::spawn(async move {
                            if let Ok(server) =
                                tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                            {
                                relay(&mut client, server, &budget).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime closes the listener and every proxied connection.
        });
        listening
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy listening");
        self.stop = Some(stop);
        self.thread = Some(thread);
    }

    fn pause(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.pause();
    }
}

/// Asserts that a command exited with `code` and that its output says each of `needles`.
fn assert_fails_with(output: &Output, code: i32, needles: &[&str]) {
    let said = text(output);
    assert_eq!(output.status.code(), Some(code), "{said}");
    for needle in needles {
        assert!(said.contains(needle), "expected `{needle}` in: {said}");
    }
}

/// The reference YAML with a `storage:` block (`body`: its indented lines) before `vars:`.
fn with_storage(yaml: String, body: &str) -> String {
    yaml.replacen("\nvars:", &format!("\nstorage:\n{body}\nvars:"), 1)
}

const FEW_RETRIES: &str = "  max_retries: 2\n  retry_timeout_secs: 10\n";

/// A copy of the reference project under the scratch folder with its YAML rewritten by `edit`.
fn project(scratch: &Scratch, edit: &dyn Fn(String) -> String) -> std::path::PathBuf {
    let project = scratch.dir.path().join("project");
    let _ = std::fs::remove_dir_all(&project);
    std::fs::create_dir_all(project.join("pipelines")).expect("project");
    crate::common::copy_dir(&repo().join("sql"), &project.join("sql"));
    let yaml = std::fs::read_to_string(repo().join("pipelines/transactions.yaml")).expect("yaml");
    std::fs::write(project.join("pipelines/t.yaml"), edit(yaml)).expect("yaml");
    project
}

/// Copies both ways; the server's bytes count against `budget` (when it is not negative), and the
/// connection is cut once it runs out.
async fn relay(
    client: &mut tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    budget: &std::sync::atomic::AtomicI64,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.into_split();
    let upstream = tokio::io::copy(&mut from_client, &mut to_server);
    let downstream = async {
        let mut buffer = vec![0u8; 8192];
        loop {
            let n = match from_server.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let left = budget.load(Ordering::SeqCst);
            let allowed = if left < 0 {
                n
            } else {
                let allowed = n.min(left as usize);
                budget.fetch_sub(allowed as i64, Ordering::SeqCst);
                allowed
            };
            if to_client.write_all(&buffer[..allowed]).await.is_err() || allowed < n {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Row counts and money sums of every Silver and Gold table, as text.
async fn fingerprint(lake: impl Into<Location>) -> Vec<Vec<String>> {
    let tables = [
        "silver.transactions",
        "silver.cards",
        "silver.users",
        "gold.daily_kpis",
        "gold.fact_transactions",
        "gold.merchant_daily",
        "gold.dim_card",
        "gold.dim_user",
        "gold.dim_merchant",
        "gold.dim_date",
    ];
    let lake = lake.into();
    query(
        lake,
        &tables,
        "SELECT 'silver', COUNT(*), CAST(SUM(amount) AS VARCHAR), COUNT(DISTINCT dms_id) FROM silver.transactions \
         UNION ALL SELECT 'kpis', COUNT(*), CAST(SUM(total_amount) AS VARCHAR), SUM(txn_count) FROM gold.daily_kpis \
         UNION ALL SELECT 'fact', COUNT(*), CAST(SUM(amount) AS VARCHAR), COUNT(DISTINCT transaction_id) FROM gold.fact_transactions \
         UNION ALL SELECT 'merchant_daily', COUNT(*), CAST(SUM(total_amount) AS VARCHAR), SUM(txn_count) FROM gold.merchant_daily \
         UNION ALL SELECT 'cards', COUNT(*), '', 0 FROM silver.cards \
         UNION ALL SELECT 'users', COUNT(*), '', 0 FROM silver.users \
         UNION ALL SELECT 'dims', (SELECT COUNT(*) FROM gold.dim_card) + (SELECT COUNT(*) FROM gold.dim_user), \
           CAST((SELECT COUNT(*) FROM gold.dim_merchant) AS VARCHAR), (SELECT COUNT(*) FROM gold.dim_date) \
         ORDER BY 1",
    )
    .await
}

const PYTHON_READER: &str = r#"
import os, sys
try:
    from deltalake import DeltaTable
    endpoint, key, secret, lake = sys.argv[1:5]
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    for name in ["daily_kpis", "fact_transactions", "merchant_daily"]:
        table = DeltaTable(f"{lake}/gold/{name}", storage_options=options).to_pyarrow_table()
        amount = "amount" if name == "fact_transactions" else "total_amount"
        print(name, table.num_rows, sum(table.column(amount).to_pylist()))
    sys.stdout.flush()
    os._exit(0)
except Exception as error:
    print(error, file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_pipeline_on_s3_equals_the_local_run_and_python_reads_it() {
    let scratch = Scratch::new();
    scratch.generate(4_000, 20, 4, 21);
    assert_success(&scratch.run());
    let local = fingerprint(&scratch.lake()).await;

    let server = S3Server::start();
    server.create_bucket("landing");
    server.create_bucket("lake");
    server.upload(&scratch.landing(), "landing", "dms");
    let (lake, landing) = ("s3://lake/medallion", "s3://landing/dms");
    let first = server.medallion(lake, landing, &["run", "pipelines/transactions.yaml"]);
    assert_success(&first);
    let remote = fingerprint(&server.location(lake)).await;
    assert_eq!(remote, local, "same rows and sums on S3 as on local disk");
    assert!(
        server
            .keys("lake", "medallion/gold/daily_kpis/_delta_log/")
            .iter()
            .any(|k| k.ends_with("00000000000000000000.json")),
        "Delta log on the server"
    );
    assert!(
        server
            .keys("lake", "medallion/_medallion/locks/")
            .is_empty(),
        "the run lock object is removed at the end of the run"
    );

    // A second run finds nothing new and changes nothing.
    let second = server.medallion(lake, landing, &["run", "pipelines/transactions.yaml"]);
    assert_success(&second);
    assert_eq!(fingerprint(&server.location(lake)).await, local);

    // Upkeep on the server: compaction, vacuum within the promised windows and checkpoints change no data.
    let maintained = server.medallion(
        lake,
        landing,
        &[
            "maintain",
            "--optimize",
            "--vacuum",
            "--checkpoint",
            "pipelines/transactions.yaml",
        ],
    );
    assert_success(&maintained);
    assert_eq!(fingerprint(&server.location(lake)).await, local);
    assert!(
        server
            .keys("lake", "medallion/silver/transactions/_delta_log/")
            .iter()
            .any(|k| k.ends_with(".checkpoint.parquet")),
        "a checkpoint on the server"
    );

    // Python `deltalake` reads Gold from the server with storage options.
    let output = Command::new(python())
        .args(["-c", PYTHON_READER, &server.endpoint(), &server.key_id])
        .args([&server.secret, lake])
        .output()
        .expect("python");
    assert!(output.status.success(), "python: {}", text(&output));
    let expected = query(
        &scratch.lake(),
        &["gold.daily_kpis", "gold.fact_transactions", "gold.merchant_daily"],
        "SELECT 'daily_kpis', COUNT(*), CAST(SUM(total_amount) AS VARCHAR) FROM gold.daily_kpis \
         UNION ALL SELECT 'fact_transactions', COUNT(*), CAST(SUM(amount) AS VARCHAR) FROM gold.fact_transactions \
         UNION ALL SELECT 'merchant_daily', COUNT(*), CAST(SUM(total_amount) AS VARCHAR) FROM gold.merchant_daily",
    )
    .await;
    let mut expected: Vec<String> = expected.iter().map(|r| r.join(" ")).collect();
    expected.sort();
    let mut seen: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    seen.sort();
    assert_eq!(seen, expected, "Python deltalake on S3 = medallion on disk");

    // The CLI reads the S3 lake too.
    let sql = server.medallion(
        lake,
        landing,
        &[
            "sql",
            "--lake",
            lake,
            "--format",
            "csv",
            "SELECT SUM(txn_count) AS n FROM gold.daily_kpis",
        ],
    );
    assert_success(&sql);
    let silver_rows = &local.iter().find(|r| r[0] == "silver").expect("silver")[1];
    assert_eq!(
        String::from_utf8_lossy(&sql.stdout).trim(),
        format!("n\n{silver_rows}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_to_one_table_on_s3_lose_no_commit() {
    let scratch = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("lake");
    let log = || {
        server
            .keys("lake", "shared/bronze/events/_delta_log/")
            .iter()
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect()
    };
    crate::concurrency::race_writers(
        &scratch,
        "s3://lake/shared",
        &server.env(),
        &server.location("s3://lake/shared"),
        &log,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_failures_are_named_refused_cleanly_and_a_later_run_converges() {
    let scratch = Scratch::new();
    scratch.generate(2_000, 12, 3, 8);
    let held = scratch.hold_back_changes(2);
    let mut server = S3Server::start();
    server.create_bucket("lake");
    let landing = scratch.landing();
    let landing = landing.to_string_lossy();
    let run = ["run", "pipelines/transactions.yaml"];

    // Wrong credentials: refused before anything is written, exit 3.
    let wrong = server.medallion_in(
        &repo(),
        "s3://lake/l",
        &landing,
        &run,
        &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
    );
    assert_fails_with(&wrong, 3, &["`s3://lake/l`", "access denied"]);
    let message = text(&wrong);
    assert!(!message.contains(&server.secret) && !message.contains("not-the-secret"));
    assert!(server.keys("lake", "l/").is_empty(), "nothing written");

    // A bucket that does not exist.
    let missing = server.medallion("s3://no-such-bucket/l", &landing, &run);
    assert_fails_with(
        &missing,
        3,
        &["`s3://no-such-bucket/l`", "bucket does not exist"],
    );

    // A landing prefix that holds nothing: the stage fails naming the source and the prefix.
    let empty = server.medallion("s3://lake/other", "s3://lake/no-landing", &run);
    assert_fails_with(
        &empty,
        1,
        &[
            "source `transactions`: landing folder `s3://lake/no-landing/public/transactions` does not \
             exist or holds no file",
        ],
    );

    // A good first run, then the server goes away: exit 3, named, with few retries configured.
    assert_success(&server.medallion("s3://lake/l", &landing, &run));
    let before = fingerprint(&server.location("s3://lake/l")).await;
    for (aside, original) in &held {
        std::fs::rename(aside, original).expect("deliver held files");
    }
    server.proxy.pause();
    let project = project(&scratch, &|yaml| with_storage(yaml, FEW_RETRIES));
    let clock = std::time::Instant::now();
    let down = server.medallion_in(
        &project,
        "s3://lake/l",
        &landing,
        &["run", "pipelines/t.yaml"],
        &[],
    );
    assert_fails_with(&down, 3, &["`s3://lake/l`", "cannot reach"]);
    assert!(
        clock.elapsed() < Duration::from_secs(60),
        "gave up after the configured retries"
    );

    // The server is back: the tables are as the first run left them, and the next run converges to
    // the result of one local run over all the files.
    server.proxy.resume();
    assert_eq!(fingerprint(&server.location("s3://lake/l")).await, before);
    assert_success(&server.medallion_in(
        &project,
        "s3://lake/l",
        &landing,
        &["run", "pipelines/t.yaml"],
        &[],
    ));
    assert_success(&scratch.run());
    assert_eq!(
        fingerprint(&server.location("s3://lake/l")).await,
        fingerprint(&scratch.lake()).await
    );
}

/// A Silver with deletion vectors on the server: the daily batches mark rows in its files there,
/// and Gold's stages, medallion's own reads and the CLI give what the same runs give on local disk.
#[tokio::test(flavor = "multi_thread")]
async fn silver_with_deletion_vectors_on_s3_equals_the_local_run() {
    let scratch = Scratch::new();
    scratch.generate(4_000, 20, 4, 22);
    let held = scratch.hold_back_all_changes();
    assert!(!held.is_empty(), "change files to deliver");
    // Silver with vectors, and the fact refreshed by key through them.
    let project = scratch.edit_project(&keyed_fact, None);
    let server = S3Server::start();
    server.create_bucket("landing");
    server.create_bucket("lake");
    let (lake, landing) = ("s3://lake/medallion", "s3://landing/dms");
    // What the fact's run did: the same on both sides, the vectors read on the server as on disk
    // (a vector not read would send its file's rows to be recomputed).
    let keyed_scope = |output: &std::process::Output| {
        text(output)
            .lines()
            .filter_map(|l| l.split("; ").find(|part| part.contains("recomputed from")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut keyed_runs = 0;
    let mut run = |dir: &Path| {
        server.upload(dir, "landing", "dms");
        let local = scratch.command_in(&project, &["run", "pipelines/t.yaml"]);
        assert_success(&local);
        let remote =
            server.medallion_in(&project, lake, landing, &["run", "pipelines/t.yaml"], &[]);
        assert_success(&remote);
        assert_eq!(keyed_scope(&remote), keyed_scope(&local));
        keyed_runs += keyed_scope(&local).len();
    };
    // The full load, then each day's changes, delivered on both sides alike.
    run(&scratch.landing());
    for (aside, original) in held {
        let day = scratch.dir.path().join("day");
        let _ = std::fs::remove_dir_all(&day);
        let relative = original
            .strip_prefix(scratch.landing())
            .expect("under the landing");
        std::fs::create_dir_all(day.join(relative).parent().expect("folder")).expect("day");
        std::fs::copy(&aside, day.join(relative)).expect("copy the day's file");
        std::fs::rename(&aside, &original).expect("deliver the day's file");
        run(&day);
    }
    assert!(keyed_runs > 0, "the fact was never refreshed by key");
    assert!(
        server
            .keys("lake", "medallion/silver/transactions/deletion_vector_")
            .iter()
            .any(|k| k.ends_with(".bin")),
        "the batches marked rows in files on the server"
    );
    let local = fingerprint(&scratch.lake()).await;
    assert_eq!(fingerprint(&server.location(lake)).await, local);
    // Upkeep on the server through the vectors: compaction, and a vacuum that lists the tables'
    // objects and reads their commits, change no data (nothing is old enough to go).
    let maintained = server.medallion_in(
        &project,
        lake,
        landing,
        &["maintain", "pipelines/t.yaml", "--optimize", "--vacuum"],
        &[],
    );
    assert_success(&maintained);
    assert!(
        text(&maintained).contains("silver.transactions"),
        "{}",
        text(&maintained)
    );
    assert_eq!(fingerprint(&server.location(lake)).await, local);
    let sql = server.medallion(
        lake,
        landing,
        &[
            "sql",
            "--lake",
            lake,
            "--format",
            "csv",
            "SELECT COUNT(*) AS n FROM silver.transactions WHERE txn_date >= DATE '2019-10-25'",
        ],
    );
    assert_success(&sql);
    let expected = query(
        &scratch.lake(),
        &["silver.transactions"],
        "SELECT COUNT(*) FROM silver.transactions WHERE txn_date >= DATE '2019-10-25'",
    )
    .await;
    assert_ne!(expected[0][0], "0", "the last days hold rows");
    assert_eq!(
        String::from_utf8_lossy(&sql.stdout).trim(),
        format!("n\n{}", expected[0][0])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_landing_files_in_date_folders_on_s3_land_like_local_ones() {
    let scratch = Scratch::new();
    medallion::generate::generate(&medallion::generate::GenerateOptions {
        out: scratch.landing(),
        transactions: 3_000,
        days: 15,
        change_days: 4,
        seed: 13,
        style: medallion::generate::FileStyle {
            header: true,
            parquet: true,
            gzip: false,
        },
        date_folders: true,
        change_seq: true,
        rows_per_load_file: 1_000,
        change_batch: 0,
        change_batch_days: 0,
    })
    .expect("generate");
    let project = project(&scratch, &|yaml| {
        yaml.replace("    format: csv\n", "    format: parquet\n")
            .replace(
                "      timestamp_column: dms_commit_ts\n",
                "      timestamp_column: dms_commit_ts\n      change_seq: true\n",
            )
    });
    let args = ["run", "pipelines/t.yaml"];
    assert_success(&scratch.command_in(&project, &args));
    let server = S3Server::start();
    server.create_bucket("data");
    server.upload(&scratch.landing(), "data", "landing");
    assert!(
        server
            .keys("data", "landing/public/transactions/")
            .iter()
            .any(|k| k.split('/').count() > 6 && k.ends_with(".parquet")),
        "change files sit in YYYY/MM/DD folders"
    );
    let (lake, landing) = ("s3://data/lake", "s3://data/landing");
    let run = server.medallion_in(&project, lake, landing, &args, &[]);
    assert_success(&run);
    assert_eq!(
        fingerprint(&server.location(lake)).await,
        fingerprint(&scratch.lake()).await
    );
    let ledger = query(
        &server.location(lake),
        &["_medallion.ingested_files"],
        "SELECT COUNT(*) FROM _medallion.ingested_files",
    )
    .await;
    let files = server
        .keys("data", "landing/")
        .iter()
        .filter(|k| k.ends_with(".parquet") || k.ends_with(".json"))
        .count();
    assert_eq!(
        ledger[0][0],
        files.to_string(),
        "every landing file in the ledger once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_commit_configurations_are_refused_unless_the_user_opts_in() {
    let scratch = Scratch::new();
    scratch.generate(1_000, 6, 2, 3);
    let landing = scratch.landing();
    let landing = landing.to_string_lossy();
    let run = ["run", "pipelines/transactions.yaml"];

    // An option that turns commits into copy-and-delete: refused as invalid (exit 2), nothing written.
    let server = S3Server::start();
    server.create_bucket("lake");
    let renamed = server.medallion_in(
        &repo(),
        "s3://lake/l",
        &landing,
        &run,
        &[("AWS_S3_ALLOW_UNSAFE_RENAME", "true")],
    );
    assert_fails_with(&renamed, 2, &["`AWS_S3_ALLOW_UNSAFE_RENAME` is set"]);
    assert!(server.keys("lake", "l/").is_empty());

    // A server that ignores `If-None-Match: *` (the header is dropped before moto sees it, so this one
    // runs without signature checks): the probe finds out and the run stops (exit 3).
    let careless = S3Server::start_with(&["--ignore-conditional-writes"]);
    careless.create_bucket("lake");
    let refused = careless.medallion("s3://lake/l", &landing, &run);
    assert_fails_with(
        &refused,
        3,
        &["does not refuse a second create of the same object"],
    );
    assert!(
        careless.keys("lake", "l/").is_empty(),
        "the probe cleans up"
    );

    // Opting in runs it, with a warning.
    let project = project(&scratch, &|yaml| {
        with_storage(yaml, "  allow_unsafe_writes: true\n")
    });
    let opted = careless.medallion_in(
        &project,
        "s3://lake/l",
        &landing,
        &["run", "pipelines/t.yaml"],
        &[],
    );
    assert_success(&opted);
    assert!(
        text(&opted).contains("ignores conditional writes"),
        "{}",
        text(&opted)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_landing_file_cut_off_by_storage_is_not_set_aside_and_lands_on_the_next_run() {
    let scratch = Scratch::new();
    scratch.generate(3_000, 10, 2, 29);
    let server = S3Server::start();
    server.create_bucket("landing");
    let transactions = scratch.transactions_dir();
    server.upload(&transactions, "landing", "dms/public/transactions");
    // Only transactions come from S3 (and may be quarantined if bad); the rest stays on disk.
    let project = project(&scratch, &|yaml| {
        let yaml = yaml.replacen(
            "${MEDALLION_LANDING:-data/landing}/public/transactions",
            "s3://landing/dms/public/transactions\n    on_bad_file: quarantine",
            1,
        );
        with_storage(yaml, FEW_RETRIES)
    });
    let bytes: u64 = std::fs::read_dir(&transactions)
        .expect("landing")
        .map(|e| e.expect("entry").metadata().expect("size").len())
        .sum();
    // Enough for the listing and the checksum reads, not for reading everything once more to land it.
    server.proxy.budget.store(
        (bytes + bytes / 2) as i64,
        std::sync::atomic::Ordering::SeqCst,
    );
    let lake = scratch.lake();
    let lake = lake.to_string_lossy();
    let landing = scratch.landing();
    let landing = landing.to_string_lossy();
    let args = ["run", "pipelines/t.yaml"];
    let cut = server.medallion_in(&project, &lake, &landing, &args, &[]);
    assert_fails_with(&cut, 1, &["could not be read from storage"]);
    assert!(
        !text(&cut).contains("bad landing file set aside"),
        "no file taken for a bad one: {}",
        text(&cut)
    );
    assert!(
        !scratch.lake().join("quarantine/files").exists()
            && !scratch.lake().join("_medallion/bad_files").exists(),
        "nothing set aside as bad: {}",
        text(&cut)
    );
    // Storage answers again: the same files land, as in a run from disk.
    server
        .proxy
        .budget
        .store(-1, std::sync::atomic::Ordering::SeqCst);
    assert_success(&server.medallion_in(&project, &lake, &landing, &args, &[]));
    let local = Scratch::new();
    std::fs::rename(scratch.landing(), local.landing()).expect("move landing");
    assert_success(&local.run());
    assert_eq!(
        fingerprint(&scratch.lake()).await,
        fingerprint(&local.lake()).await
    );
}
