//! `parse_ts(text) -> TIMESTAMP` (microseconds, no zone): `2010-01-01 00:01:00`, with optional seconds and
//! fraction (DMS commit timestamps `yyyy-MM-dd HH:mm:ss.SSSSSS`), or a `T` separator. Invalid dates such
//! as `2019-02-30` give NULL.
//! `parse_month(text) -> DATE`: `MM/YYYY` (card expiry, account open date) → the first of that month.

use chrono::{Datelike, NaiveDate, NaiveDateTime};

pub fn parse_ts(text: &str) -> Option<i64> {
    let text = text.trim();
    // Nearly every value has the DMS shape: read it by hand (chrono re-reads its format string on each
    // call, which was a fifth of a Silver stage's time). Anything else goes the general way below.
    if let Some(micros) = dms_shape(text.as_bytes()) {
        return Some(micros);
    }
    parse_general(text)
}

/// `YYYY-MM-DD HH:MM`, `YYYY-MM-DD HH:MM:SS`, or with a fraction of 1 to 9 digits (`T` for the space
/// when there are seconds); `None` for anything else, valid or not, which [`parse_general`] then decides.
fn dms_shape(b: &[u8]) -> Option<i64> {
    let number = |from: usize, to: usize| -> Option<u32> {
        b.get(from..to)?.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    if b.len() < 16 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' {
        return None;
    }
    let (second, nanos) = match b.len() {
        16 if b[10] == b' ' => (0, 0),
        19 if b[16] == b':' => (number(17, 19)?, 0),
        n if (21..=29).contains(&n) && b[16] == b':' && b[19] == b'.' => {
            let digits = &b[20..];
            let fraction = number(20, n)?;
            (
                number(17, 19)?,
                fraction * 10u32.pow(9 - digits.len() as u32),
            )
        }
        _ => return None,
    };
    if b[10] != b' ' && !(b[10] == b'T' && b.len() > 16) {
        return None;
    }
    let (hour, minute) = (number(11, 13)?, number(14, 16)?);
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(number(0, 4)?).ok()?,
        number(5, 7)?,
        number(8, 10)?,
    )?;
    let days = i64::from(date.num_days_from_ce()) - i64::from(UNIX_EPOCH_DAYS_FROM_CE);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(seconds * 1_000_000 + i64::from(nanos / 1_000))
}

/// Days from 0001-01-01 (day 1) to 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

fn parse_general(text: &str) -> Option<i64> {
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
    fn the_fast_path_agrees_with_chrono() {
        let mut cases = vec![
            "2019-10-31 23:59:59.999999".to_string(),
            "2019-10-31T23:59:59".into(),
            "2019-10-31T23:59".into(),
            "2020-02-29 12:00".into(),
            "2019-02-29 12:00".into(),
            "2019-01-01 24:00:00".into(),
            "2019-01-01 00:60:00".into(),
            "2019-01-01 00:00:60".into(),
            "2019-01-01 00:00:00.".into(),
            "2019-01-01 00:00:00.1234567891".into(),
            "2019-01-01 00:00:00.123456789".into(),
            "2019-01-01 00:00:00.5".into(),
            "0001-01-01 00:00:00".into(),
            "1969-12-31 23:59:59.9".into(),
            "2019-1-01 00:00:00".into(),
            "2019-01-01  0:00:00".into(),
            "+2019-01-01 00:00:00".into(),
        ];
        // And a sweep of digits through every position of a well-formed value.
        let base = "2016-07-15 13:45:30.250000";
        for position in 0..base.len() {
            for replacement in ['0', '3', '9', ' ', 'x'] {
                let mut text = base.to_string();
                text.replace_range(position..=position, &replacement.to_string());
                cases.push(text);
            }
        }
        for case in cases {
            assert_eq!(
                parse_ts(&case),
                parse_general(case.trim()),
                "fast and general parse disagree on {case:?}"
            );
        }
    }

    #[test]
    fn parses_month_year() {
        assert_eq!(parse_month("01/1970"), Some(0));
        assert_eq!(parse_month("02/1970"), Some(31));
        assert_eq!(parse_month("13/2020"), None);
    }
}
