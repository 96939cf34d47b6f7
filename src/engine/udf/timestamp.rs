//! `parse_ts(text) -> TIMESTAMP` (microseconds, no zone): `2010-01-01 00:01:00`, with optional seconds and
//! fraction (DMS commit timestamps `yyyy-MM-dd HH:mm:ss.SSSSSS`), or a `T` separator. Invalid dates such
//! as `2019-02-30` give NULL.
//! `parse_month(text) -> DATE`: `MM/YYYY` (card expiry, account open date) → the first of that month.

use chrono::{NaiveDate, NaiveDateTime};

pub fn parse_ts(text: &str) -> Option<i64> {
    let text = text.trim();
    let formats = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
    ];
    formats
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc().timestamp_micros())
}

/// Days since 1970-01-01 of the first day of `MM/YYYY`.
pub fn parse_month(text: &str) -> Option<i32> {
    let (month, year) = text.trim().split_once('/')?;
    let date = NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dms_timestamps() {
        assert_eq!(parse_ts("1970-01-01 00:01:00"), Some(60_000_000));
        assert_eq!(parse_ts("1970-01-01 00:01"), Some(60_000_000));
        assert_eq!(parse_ts("1970-01-01 00:00:00.000123"), Some(123));
        assert_eq!(parse_ts("2019-02-30 00:00:00"), None);
        assert_eq!(parse_ts(""), None);
    }

    #[test]
    fn parses_month_year() {
        assert_eq!(parse_month("01/1970"), Some(0));
        assert_eq!(parse_month("02/1970"), Some(31));
        assert_eq!(parse_month("13/2020"), None);
    }
}
