//! Completion notifications against real receivers on 127.0.0.1: an HTTP server in the test for webhooks
//! (scripted answers, every request recorded) and moto's SNS server with an SQS queue subscribed to the
//! topic.

use std::{
    collections::VecDeque,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::common::{Scratch, assert_success, python, text};

#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A real HTTP/1.1 server answering each request with the next scripted status (then 200).
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let log = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head_end, length) = loop {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while buffer.len() < head_end + length {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
                    let headers = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                        .collect();
                    let body = buffer[head_end..(head_end + length).min(buffer.len())].to_vec();
                    log.lock().expect("log").push(Received { headers, body });
                    let status = script.lock().expect("script").pop_front().unwrap_or(200);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Receiver { port, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("log").clone()
    }
}

const SECRET: &str = "s3cret-for-tests";

fn webhook_yaml(port: u16, on: &str) -> impl Fn(String) -> String {
    let block = format!(
        "\nnotify:\n  - name: ops\n    on: [{on}]\n    webhook:\n      url: http://127.0.0.1:{port}/hook\n      \
         headers: {{ Authorization: \"Bearer ${{MEDALLION_TEST_TOKEN}}\" }}\n      secret_env: MEDALLION_TEST_SECRET\n      \
         backoff_ms: 20\n      timeout_secs: 5\n"
    );
    move |yaml: String| format!("{yaml}{block}")
}

fn with_env<T>(f: impl FnOnce() -> T) -> T {
    // The variables are read by the medallion process the tests start, which inherits this environment.
    // SAFETY: set once with the same values by every test of this module before starting processes.
    unsafe {
        std::env::set_var("MEDALLION_TEST_TOKEN", "tok-123");
        std::env::set_var("MEDALLION_TEST_SECRET", SECRET);
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    f()
}

fn verify_signature(received: &Received) {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&received.body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        received.header("X-Medallion-Signature"),
        Some(want.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_gets_one_signed_report_per_run_after_retrying_503s() {
    let receiver = Receiver::start(&[503, 503]).await;
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 12);
    let output =
        with_env(|| scratch.run_edited(&webhook_yaml(receiver.port, "success, failure"), None));
    assert_success(&output);

    let received = receiver.received();
    assert_eq!(received.len(), 3, "two 503 answers, then delivered");
    assert!(
        received.windows(2).all(|w| w[0].body == w[1].body),
        "retries send the same body"
    );
    let last = &received[2];
    verify_signature(last);
    assert_eq!(last.header("Authorization"), Some("Bearer tok-123"));
    assert_eq!(last.header("Content-Type"), Some("application/json"));
    let report = last.json();
    assert_eq!(report["pipeline"], "transactions");
    assert_eq!(report["status"], "succeeded");
    assert!(report["run_id"].as_str().is_some_and(|r| r.len() == 36));
    assert!(report["started_at"].as_str().is_some());
    let stages = report["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 15);
    let silver = stages
        .iter()
        .find(|s| s["stage"] == "silver_transactions")
        .expect("silver");
    assert!(silver["rows_written"].as_u64().unwrap_or(0) > 0);
    assert!(report["versions_written"]["gold.daily_kpis"].is_u64());
    assert!(
        !text(&output).contains("tok-123"),
        "the token is never printed"
    );

    // A second run sends exactly one more.
    let output =
        with_env(|| scratch.run_edited(&webhook_yaml(receiver.port, "success, failure"), None));
    assert_success(&output);
    assert_eq!(receiver.received().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_is_not_retried_and_a_failed_notification_does_not_fail_the_run() {
    let receiver = Receiver::start(&[400]).await;
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 13);
    let output = with_env(|| scratch.run_edited(&webhook_yaml(receiver.port, "success"), None));
    assert_success(&output);
    assert_eq!(receiver.received().len(), 1, "4xx is not retried");
    assert!(
        text(&output).contains("notification `ops` not delivered: webhook `ops`: HTTP 400"),
        "{}",
        text(&output)
    );

    let runs = scratch.edited_history();
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["notifications_failed"][0]["target"], "ops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_webhook_does_not_fail_the_run_and_shows_in_history() {
    // A port with nothing listening.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 14);
    let edit = move |yaml: String| {
        webhook_yaml(port, "success")(yaml)
            .replace("backoff_ms: 20", "backoff_ms: 1\n      retries: 1")
    };
    let output = with_env(|| scratch.run_edited(&edit, None));
    assert_success(&output);
    let project = scratch.dir.path().join("project");
    let history = scratch.command_in(&project, &["history", "pipelines/t.yaml"]);
    let table = text(&history);
    assert!(table.contains("notification ops failed"), "{table}");
    assert!(table.contains("cannot connect"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_run_notifies_with_the_failed_check() {
    let receiver = Receiver::start(&[]).await;
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 15);
    let output = with_env(|| {
        scratch.run_edited(
            &webhook_yaml(receiver.port, "failure"),
            Some(("gold/daily_kpis.sql", &crate::common::drop_refunds)),
        )
    });
    assert_eq!(output.status.code(), Some(1));
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    verify_signature(&received[0]);
    let report = received[0].json();
    assert_eq!(report["status"], "failed");
    let failed = report["failed_checks"]
        .as_array()
        .expect("failed checks")
        .iter()
        .find(|c| c["check"]["name"] == "total_amount_matches_silver")
        .expect("the reconciliation check is reported")
        .clone();
    assert_eq!(failed["stage"], "gold_daily_kpis");
    assert!(
        failed["check"]["observed"]
            .as_str()
            .is_some_and(|o| o != "NULL")
    );
    assert_eq!(failed["check"]["passed"], false);
}

/// moto's server (from the project's Python setup), stopped when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Moto {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let python = python();
    let server = std::path::Path::new(&python).with_file_name("moto_server");
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server (installed by .ci/setup-python.sh)");
    // Dropping the guard kills and waits for the server on every path, including the panic below.
    let moto = Moto { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return moto;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto_server did not start on port {port}");
}

const SNS_SETUP: &str = r#"
import json, os, sys, boto3
endpoint = sys.argv[1]
sns = boto3.client("sns", endpoint_url=endpoint, region_name="us-east-1")
sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
if sys.argv[2] == "setup":
    topic = sns.create_topic(Name="medallion-runs")["TopicArn"]
    queue = sqs.create_queue(QueueName="medallion-runs")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    print(topic)
else:
    queue = sqs.get_queue_url(QueueName="medallion-runs")["QueueUrl"]
    messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=2).get("Messages", [])
    print(json.dumps([json.loads(m["Body"]) for m in messages]))
sys.stdout.flush()
os._exit(0)
"#;

fn sns_script(endpoint: &str, action: &str) -> String {
    let output = Command::new(python())
        .args(["-c", SNS_SETUP, endpoint, action])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sns_publish_reaches_a_subscribed_queue_with_subject_body_and_attributes() {
    let moto = start_moto();
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let topic = sns_script(&endpoint, "setup");
    assert!(topic.starts_with("arn:aws:sns:us-east-1:"), "{topic}");

    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 16);
    let block = format!(
        "\nnotify:\n  - name: ops-sns\n    sns:\n      topic_arn: {topic}\n      region: us-east-1\n      endpoint_url: {endpoint}\n"
    );
    let run = with_env(|| scratch.run_edited(&|y| format!("{y}{block}"), None));
    assert_success(&run);
    let runs = scratch.edited_history();
    let run_id = runs[0]["run_id"].as_str().expect("run id").to_string();
    assert_eq!(
        runs[0]["notifications_failed"],
        serde_json::json!([]),
        "{runs}"
    );

    let messages: serde_json::Value =
        serde_json::from_str(&sns_script(&endpoint, "read")).expect("json");
    let envelope = &messages[0];
    assert_eq!(envelope["TopicArn"], topic.as_str());
    assert_eq!(
        envelope["Subject"],
        "medallion: pipeline transactions succeeded"
    );
    let body: serde_json::Value =
        serde_json::from_str(envelope["Message"].as_str().expect("message")).expect("report JSON");
    assert_eq!(body["run_id"], run_id.as_str());
    assert_eq!(body["status"], "succeeded");
    assert_eq!(
        envelope["MessageAttributes"]["status"]["Value"],
        "succeeded"
    );
    assert_eq!(
        envelope["MessageAttributes"]["pipeline"]["Value"],
        "transactions"
    );

    // notify-test sends a sample to the same topic.
    let project = scratch.dir.path().join("project");
    let test = scratch.command_in(&project, &["notify-test", "pipelines/t.yaml"]);
    assert_success(&test);
    assert!(
        text(&test).contains("ops-sns (sns): delivered"),
        "{}",
        text(&test)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_notification_that_fails_fails_the_run() {
    let receiver = Receiver::start(&[500, 500]).await;
    let scratch = Scratch::new();
    scratch.generate(1_000, 5, 1, 17);
    let edit = move |yaml: String| {
        webhook_yaml(receiver.port, "success")(yaml)
            .replace(
                "    on: [success]\n",
                "    on: [success]\n    required: true\n",
            )
            .replace("backoff_ms: 20", "backoff_ms: 1\n      retries: 1")
    };
    let output = with_env(|| scratch.run_edited(&edit, None));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("notification `ops` not delivered"),
        "{}",
        text(&output)
    );
    // The data was published all the same: a notification never changes data.
    assert!(crate::common::delta_version(&scratch.table("gold", "daily_kpis")).is_some());
}
