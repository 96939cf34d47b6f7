//! The UDFs that type raw DMS strings (money, zip, timestamps, months, card numbers, channels) on
//! arbitrary text: a value or `None`, never a panic; money that parses prints back to the same cents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medallion::engine::udf::{
    card_last4, parse_channel, parse_money, parse_month, parse_ts, parse_zip,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_zip(&text);
    let _ = parse_ts(&text);
    let _ = parse_month(&text);
    let _ = card_last4(&text);
    let _ = parse_channel(&text);
    if let Some(cents) = parse_money(&text) {
        let sign = if cents < 0 { "-" } else { "" };
        let canonical = format!("${sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100);
        assert_eq!(parse_money(&canonical), Some(cents), "`{text}` → {cents} → `{canonical}`");
    }
});
