//! `parse_channel(use_chip) -> STRING`: `Swipe Transaction` → SWIPE, `Chip Transaction` → CHIP,
//! `Online Transaction` → ONLINE; anything else gives NULL.

pub fn parse_channel(text: &str) -> Option<&'static str> {
    match text.trim() {
        "Swipe Transaction" => Some("SWIPE"),
        "Chip Transaction" => Some("CHIP"),
        "Online Transaction" => Some("ONLINE"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_three_channels() {
        assert_eq!(parse_channel("Swipe Transaction"), Some("SWIPE"));
        assert_eq!(parse_channel("Chip Transaction"), Some("CHIP"));
        assert_eq!(parse_channel("Online Transaction"), Some("ONLINE"));
        assert_eq!(parse_channel("Tap"), None);
    }
}
