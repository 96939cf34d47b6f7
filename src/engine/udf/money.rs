//! `parse_money(text) -> DECIMAL(18,2)`: `$-77.00`, `$14.57`, `$24295` (sign after the dollar, also
//! accepted before it). Empty gives NULL; anything else that is not money, or more than two decimals, or
//! beyond DECIMAL(18,2), gives NULL so that an expectation can report the row.

/// Largest absolute value of DECIMAL(18,2), in cents.
const MAX_CENTS: i128 = 999_999_999_999_999_999;

/// Parses money into cents.
pub fn parse_money(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative_before, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let text = text.strip_prefix('$').unwrap_or(text);
    let (negative_after, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if negative_before && negative_after {
        return None;
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    let whole = whole.replace(',', "");
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 2
        || whole.len() > 18
    {
        return None;
    }
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let cents_part: i128 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<i128>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    let cents = whole.checked_mul(100)?.checked_add(cents_part)?;
    if cents > MAX_CENTS {
        return None;
    }
    Some(if negative_before || negative_after {
        -cents
    } else {
        cents
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dms_money() {
        assert_eq!(parse_money("$-77.00"), Some(-7700));
        assert_eq!(parse_money("$14.57"), Some(1457));
        assert_eq!(parse_money("$24295"), Some(2_429_500));
        assert_eq!(parse_money("$0.5"), Some(50));
        assert_eq!(parse_money("-$3.10"), Some(-310));
        assert_eq!(parse_money("$1,000.00"), Some(100_000));
    }

    #[test]
    fn rejects_what_is_not_money() {
        for bad in [
            "",
            "$",
            "$abc",
            "$1.234",
            "$--1",
            "-$-1",
            "$1.2.3",
            "$9999999999999999999",
        ] {
            assert_eq!(parse_money(bad), None, "{bad}");
        }
        assert_eq!(parse_money("$9999999999999999.99"), Some(MAX_CENTS));
    }
}
