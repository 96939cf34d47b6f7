//! `parse_zip(text) -> STRING`: DMS writes zips as floats (`58523.0`) and loses leading zeros (`6071.0` is
//! 06071). Gives the 5-digit zero-padded zip, or NULL when empty or not a US zip.

pub fn parse_zip(text: &str) -> Option<String> {
    zip_parts(text).map(|(zeros, digits)| format!("{zeros}{digits}"))
}

/// The zip as the zeros that pad it to five digits and its own digits (one to five), or `None` when it
/// is no US zip.
pub(super) fn zip_parts(text: &str) -> Option<(&'static str, &str)> {
    let text = text.trim();
    let digits = match text.split_once('.') {
        Some((whole, fraction)) if fraction.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
        None => text,
    };
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((&"00000"[digits.len()..], digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_float_zips() {
        assert_eq!(parse_zip("58523.0").as_deref(), Some("58523"));
        assert_eq!(parse_zip("6071.0").as_deref(), Some("06071"));
        assert_eq!(parse_zip("501").as_deref(), Some("00501"));
        assert_eq!(parse_zip(""), None);
        assert_eq!(parse_zip("123456.0"), None);
        assert_eq!(parse_zip("6071.5"), None);
        assert_eq!(parse_zip("Italy"), None);
    }
}
