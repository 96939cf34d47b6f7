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
    if fraction.len() > 2 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The whole part's digits, thousands separators skipped, read without allocating: at most 18
    // digits, so that the value fits before the bound check below.
    let mut digits = 0;
    let mut whole_value: i128 = 0;
    for byte in whole.bytes() {
        match byte {
            b',' => {}
            b'0'..=b'9' => {
                digits += 1;
                if digits > 18 {
                    return None;
                }
                whole_value = whole_value * 10 + i128::from(byte - b'0');
            }
            _ => return None,
        }
    }
    if digits == 0 && fraction.is_empty() {
        return None;
    }
    let cents_part = fraction
        .bytes()
        .fold(0, |cents, byte| cents * 10 + i128::from(byte - b'0'))
        * if fraction.len() == 1 { 10 } else { 1 };
    let cents = whole_value.checked_mul(100)?.checked_add(cents_part)?;
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
        assert_eq!(parse_money("$1,234,567.8"), Some(123_456_780));
        assert_eq!(parse_money(" $.05 "), Some(5));
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
            "$999,999,999,999,999,999,999",
            "$,",
            "$.",
            "$1,5x",
        ] {
            assert_eq!(parse_money(bad), None, "{bad}");
        }
        assert_eq!(parse_money("$9999999999999999.99"), Some(MAX_CENTS));
    }
}
