//! Webhook delivery: one JSON POST, signed with HMAC-SHA256 when a secret is configured
//! (`X-Medallion-Signature: sha256=<hex>` over the exact body bytes), retried on 5xx, 429 and connection
//! errors, never on other 4xx.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{NotifyError, backoff};
use crate::config::WebhookTarget;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Medallion-Signature";

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts `body`; returns the attempts made, or the attempts and the last error.
pub(super) async fn send(
    name: &str,
    target: &WebhookTarget,
    body: &[u8],
) -> Result<u32, (u32, NotifyError)> {
    let error = |message: String| NotifyError::Webhook {
        target: name.to_string(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(target.timeout)
        .build()
        .map_err(|e| (0, error(format!("cannot build the HTTP client: {e}"))))?;
    let secret = match &target.secret_env {
        Some(var) => Some(std::env::var(var).map_err(|_| {
            (
                0,
                error(format!("the signing secret variable `{var}` is not set")),
            )
        })?),
        None => None,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = client
            .post(&target.url)
            .header("Content-Type", "application/json")
            .header(
                "User-Agent",
                concat!("medallion/", env!("CARGO_PKG_VERSION")),
            );
        for (header, value) in &target.headers {
            request = request.header(header, value);
        }
        if let Some(secret) = &secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        let outcome = request.body(body.to_vec()).send().await;
        let retryable = match outcome {
            Ok(response) if response.status().is_success() => return Ok(attempt),
            Ok(response) => {
                let status = response.status();
                let message = format!("HTTP {status} from the endpoint");
                if status.is_server_error() || status.as_u16() == 429 {
                    message
                } else {
                    return Err((attempt, error(format!("{message} (not retried)"))));
                }
            }
            // The URL may carry a token: say what failed without it.
            Err(e) if e.is_timeout() => format!("no answer within {:?}", target.timeout),
            Err(e) if e.is_connect() => "cannot connect to the endpoint".to_string(),
            Err(_) => "the request failed".to_string(),
        };
        if attempt > target.retries {
            return Err((
                attempt,
                error(format!("{retryable}; gave up after {attempt} attempt(s)")),
            ));
        }
        tokio::time::sleep(backoff(target.backoff, attempt - 1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
