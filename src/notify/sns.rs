//! AWS SNS delivery through the AWS SDK: credentials from the usual chain (environment, profile, web
//! identity, instance role), an optional endpoint URL for local or compatible endpoints, and `status` and
//! `pipeline` message attributes for subscription filters. The SDK retries throttling and 5xx itself.

use aws_sdk_sns::types::MessageAttributeValue;

use super::NotifyError;
use crate::config::SnsTarget;

/// SNS subjects are at most 100 ASCII characters.
fn subject(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(100)
        .collect()
}

pub(super) async fn publish(
    name: &str,
    target: &SnsTarget,
    title: &str,
    body: &[u8],
    pipeline: &str,
    status: &str,
) -> Result<u32, (u32, NotifyError)> {
    let error = |message: String| NotifyError::Sns {
        target: name.to_string(),
        message,
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &target.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &target.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    let client = aws_sdk_sns::Client::new(&config);
    let attribute = |value: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .map_err(|e| (0, error(format!("bad message attribute: {e}"))))
    };
    client
        .publish()
        .topic_arn(&target.topic_arn)
        .subject(subject(title))
        .message(String::from_utf8_lossy(body))
        .message_attributes("status", attribute(status)?)
        .message_attributes("pipeline", attribute(pipeline)?)
        .send()
        .await
        .map(|_| 1)
        .map_err(|e| {
            let detail = aws_sdk_sns::error::DisplayErrorContext(&e).to_string();
            (
                1,
                error(format!(
                    "publish to `{}` failed: {detail}",
                    target.topic_arn
                )),
            )
        })
}
