//! Completion notifications: after a run, each `notify:` target whose `on:` list holds the run's outcome
//! gets the run report, through a webhook (JSON POST, optional HMAC-SHA256 signature, retries with backoff
//! on 5xx and connection errors) or AWS SNS (Publish with status and pipeline as message attributes). A
//! notification never changes data; whether its failure fails the run is the target's `required` flag.

mod sns;
mod webhook;

use std::time::Duration;

use crate::config::{NotifyKind, NotifyTarget};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook `{target}`: {message}")]
    Webhook { target: String, message: String },
    #[error("sns `{target}`: {message}")]
    Sns { target: String, message: String },
}

/// The run's outcome as `on:` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Success,
    Failure,
    /// `notify-test`: sent to every target whatever its `on:`.
    Test,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Success => "success",
            Event::Failure => "failure",
            Event::Test => "test",
        }
    }
}

/// How one notification went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    pub target: String,
    pub kind: String,
    pub delivered: bool,
    pub attempts: u32,
    /// The error of the last attempt, when not delivered.
    pub error: Option<String>,
    /// Whether a failure here fails the run (`required: true`).
    pub required: bool,
}

/// Sends `report` (the run report as JSON) to every target that wants `event`.
pub async fn send_all(
    targets: &[NotifyTarget],
    event: Event,
    pipeline: &str,
    status: &str,
    report: &serde_json::Value,
) -> Vec<Delivery> {
    let body = serde_json::to_vec(report).unwrap_or_default();
    let mut deliveries = Vec::new();
    for target in targets
        .iter()
        .filter(|t| event == Event::Test || t.on.iter().any(|e| e == event.name()))
    {
        let (kind, result) = match &target.kind {
            NotifyKind::Webhook(webhook) => {
                ("webhook", webhook::send(&target.name, webhook, &body).await)
            }
            NotifyKind::Sns(sns) => {
                let subject = format!("medallion: pipeline {pipeline} {status}");
                (
                    "sns",
                    sns::publish(&target.name, sns, &subject, &body, pipeline, status).await,
                )
            }
        };
        let delivery = match result {
            Ok(attempts) => Delivery {
                target: target.name.clone(),
                kind: kind.into(),
                delivered: true,
                attempts,
                error: None,
                required: target.required,
            },
            Err((attempts, error)) => {
                tracing::warn!(target = %target.name, "notification not delivered: {error}");
                Delivery {
                    target: target.name.clone(),
                    kind: kind.into(),
                    delivered: false,
                    attempts,
                    error: Some(error.to_string()),
                    required: target.required,
                }
            }
        };
        deliveries.push(delivery);
    }
    deliveries
}

/// Exponential backoff with full jitter: a random wait in `[0, base * 2^attempt]`, capped.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.min(10))
        .min(Duration::from_secs(30));
    let jitter: f64 = rand::random();
    ceiling.mul_f64(jitter)
}
