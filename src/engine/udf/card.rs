//! `card_last4(card_number) -> STRING`: only the last four digits of a card number reach Silver.

pub fn card_last4(text: &str) -> Option<String> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_digit).collect();
    if digits.len() < 4
        || text
            .bytes()
            .any(|b| !(b.is_ascii_digit() || b == b' ' || b == b'-'))
    {
        return None;
    }
    String::from_utf8(digits[digits.len() - 4..].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_four_digits() {
        assert_eq!(card_last4("4344676511950444").as_deref(), Some("0444"));
        assert_eq!(card_last4("4344-6765-1195-0444").as_deref(), Some("0444"));
        assert_eq!(card_last4("123"), None);
        assert_eq!(card_last4("abcd1234"), None);
    }
}
