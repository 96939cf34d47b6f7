//! The generated world: users, cards and merchants, and transactions as a pure function of
//! (seed, id, minute, version), so an update can re-emit a full row without keeping it in memory.

use std::path::Path;

use chrono::NaiveDateTime;
use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;

use super::{ChangeSeq, GenerateError, GenerateOptions, write_load_table};

pub const MCC_JSON: &str = include_str!("../../data/mcc_codes.json");

pub const TXN_COLUMNS: [&str; 12] = [
    "id",
    "date",
    "client_id",
    "card_id",
    "amount",
    "use_chip",
    "merchant_id",
    "merchant_city",
    "merchant_state",
    "zip",
    "mcc",
    "errors",
];

const CARD_COLUMNS: [&str; 13] = [
    "id",
    "client_id",
    "card_brand",
    "card_type",
    "card_number",
    "expires",
    "cvv",
    "has_chip",
    "num_cards_issued",
    "credit_limit",
    "acct_open_date",
    "year_pin_last_changed",
    "card_on_dark_web",
];

const USER_COLUMNS: [&str; 14] = [
    "id",
    "current_age",
    "retirement_age",
    "birth_year",
    "birth_month",
    "gender",
    "address",
    "latitude",
    "longitude",
    "per_capita_income",
    "yearly_income",
    "total_debt",
    "credit_score",
    "num_credit_cards",
];

const ERRORS: [&str; 7] = [
    "Insufficient Balance",
    "Bad PIN",
    "Technical Glitch",
    "Bad Card Number",
    "Bad Expiration",
    "Bad CVV",
    "Bad Zipcode",
];

const CITIES: [(&str, &str, u32); 12] = [
    ("Beulah", "ND", 58523),
    ("Bettendorf", "IA", 52722),
    ("Vista", "CA", 92084),
    ("Harwood", "MD", 20776),
    ("Hartford", "CT", 6071),
    ("Boston", "MA", 2108),
    ("Houston", "TX", 77002),
    ("Flushing", "NY", 11355),
    ("Pearland", "TX", 77581),
    ("Little Rock", "AR", 72201),
    ("Princeton", "NJ", 8540),
    ("Miami", "FL", 33101),
];

const COUNTRIES: [&str; 6] = ["Italy", "Mexico", "Japan", "Canada", "Germany", "Haiti"];

struct Merchant {
    id: i64,
    city: &'static str,
    state: &'static str,
    zip: u32,
    mcc: &'static str,
    foreign: Option<&'static str>,
}

struct Card {
    id: i64,
    client_id: i64,
}

pub struct Catalog {
    users: u64,
    cards: Vec<Card>,
    merchants: Vec<Merchant>,
}

impl Catalog {
    pub fn new(rng: &mut ChaCha8Rng, transactions: u64) -> Catalog {
        let users = (transactions / 500).clamp(20, 2000);
        let mut mccs: Vec<&'static str> = MCC_JSON
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        if mccs.is_empty() {
            mccs.push("5812");
        }
        let mut cards = Vec::new();
        let mut card_id = 0;
        for client in 0..users as i64 {
            for _ in 0..rng.random_range(1..=5) {
                cards.push(Card {
                    id: card_id,
                    client_id: client,
                });
                card_id += 1 + rng.random_range(0..2);
            }
        }
        let merchant_count = (transactions / 40).clamp(50, 100_000);
        let merchants = (0..merchant_count)
            .map(|i| {
                let (city, state, zip) = CITIES[rng.random_range(0..CITIES.len())];
                Merchant {
                    id: 10_000 + i as i64 * 7,
                    city,
                    state,
                    zip,
                    mcc: mccs[rng.random_range(0..mccs.len())],
                    foreign: rng
                        .random_ratio(1, 100)
                        .then(|| COUNTRIES[rng.random_range(0..COUNTRIES.len())]),
                }
            })
            .collect();
        Catalog {
            users,
            cards,
            merchants,
        }
    }

    /// One transaction row (TXN_COLUMNS order). `version` 0 is the original; later versions are updates
    /// that correct the amount or the errors.
    pub fn transaction(&self, seed: u64, id: i64, minute: u32, version: u32) -> Vec<String> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let card = &self.cards[rng.random_range(0..self.cards.len())];
        let merchant = &self.merchants[rng.random_range(0..self.merchants.len())];
        let mut cents: i64 = match rng.random_range(0..100) {
            0..=4 => -rng.random_range(100..30_000),
            5 => 0,
            6..=8 => rng.random_range(100_000..500_000),
            _ => rng.random_range(100..20_000),
        };
        let channel = match rng.random_range(0..100) {
            0..=51 => "Swipe Transaction",
            52..=87 => "Chip Transaction",
            _ => "Online Transaction",
        };
        let mut errors = if rng.random_ratio(16, 1000) {
            let first = ERRORS[rng.random_range(0..ERRORS.len())];
            if rng.random_ratio(1, 5) {
                format!("{first},{}", ERRORS[rng.random_range(0..ERRORS.len())])
            } else {
                first.to_string()
            }
        } else {
            String::new()
        };
        if version > 0 {
            let mut fix =
                ChaCha8Rng::seed_from_u64(seed ^ (id as u64) ^ (u64::from(version) << 40));
            if fix.random_bool(0.6) {
                cents += fix.random_range(-5_000..5_000);
            } else {
                errors = if errors.is_empty() {
                    ERRORS
                        .choose(&mut fix)
                        .copied()
                        .unwrap_or_default()
                        .to_string()
                } else {
                    String::new()
                };
            }
        }
        let (city, state, zip) = if channel == "Online Transaction" {
            ("ONLINE".to_string(), String::new(), String::new())
        } else if let Some(country) = merchant.foreign {
            (
                merchant.city.to_string(),
                country.to_string(),
                String::new(),
            )
        } else {
            (
                merchant.city.to_string(),
                merchant.state.to_string(),
                format!("{}.0", merchant.zip),
            )
        };
        let date = chrono::DateTime::from_timestamp(i64::from(minute) * 60, 0)
            .map(|d| d.naive_utc())
            .unwrap_or_default();
        vec![
            id.to_string(),
            date.format("%Y-%m-%d %H:%M:%S").to_string(),
            card.client_id.to_string(),
            card.id.to_string(),
            money(cents),
            channel.to_string(),
            merchant.id.to_string(),
            city,
            state,
            zip,
            merchant.mcc.to_string(),
            errors,
        ]
    }

    pub fn write_users(
        &self,
        dir: &Path,
        options: &GenerateOptions,
        load_time: NaiveDateTime,
        seq: &mut ChangeSeq,
    ) -> Result<u64, GenerateError> {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x5553_4552);
        let rows = (0..self.users as i64).map(move |id| {
            let age = rng.random_range(18..90);
            let income = rng.random_range(1_000..120_000);
            vec![
                id.to_string(),
                age.to_string(),
                rng.random_range(60..75).to_string(),
                (2019 - age).to_string(),
                rng.random_range(1..=12).to_string(),
                if rng.random_bool(0.5) {
                    "Female"
                } else {
                    "Male"
                }
                .to_string(),
                format!("{} Main Street", rng.random_range(1..9999)),
                format!("{:.2}", rng.random_range(25.0..48.0)),
                format!("{:.2}", rng.random_range(-122.0..-70.0)),
                format!("${}", income / 2),
                format!("${income}"),
                format!("${}", rng.random_range(0..200_000)),
                rng.random_range(480..850).to_string(),
                rng.random_range(1..=9).to_string(),
            ]
        });
        write_load_table(dir, options, load_time, seq, &USER_COLUMNS, rows)
    }

    pub fn write_cards(
        &self,
        dir: &Path,
        options: &GenerateOptions,
        load_time: NaiveDateTime,
        seq: &mut ChangeSeq,
    ) -> Result<u64, GenerateError> {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0x4341_5244);
        let rows = self.cards.iter().map(move |card| {
            let brand = ["Visa", "Mastercard", "Amex", "Discover"][rng.random_range(0..4)];
            let kind = ["Debit", "Credit", "Debit (Prepaid)"][rng.random_range(0..3)];
            vec![
                card.id.to_string(),
                card.client_id.to_string(),
                brand.to_string(),
                kind.to_string(),
                format!("4{:015}", rng.random_range(0..999_999_999_999_999u64)),
                format!(
                    "{:02}/{}",
                    rng.random_range(1..=12),
                    rng.random_range(2020..2030)
                ),
                format!("{:03}", rng.random_range(0..1000)),
                if rng.random_ratio(9, 10) { "YES" } else { "NO" }.to_string(),
                rng.random_range(1..=3).to_string(),
                format!("${}", rng.random_range(0..40_000)),
                format!(
                    "{:02}/{}",
                    rng.random_range(1..=12),
                    rng.random_range(1995..2019)
                ),
                rng.random_range(2008..2020).to_string(),
                "No".to_string(),
            ]
        });
        write_load_table(dir, options, load_time, seq, &CARD_COLUMNS, rows)
    }
}

/// `$-77.00` / `$14.57`: the sign after the dollar.
fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("${sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_puts_the_sign_after_the_dollar() {
        assert_eq!(money(-7700), "$-77.00");
        assert_eq!(money(1457), "$14.57");
        assert_eq!(money(5), "$0.05");
    }

    #[test]
    fn a_transaction_is_a_function_of_its_inputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let catalog = Catalog::new(&mut rng, 1000);
        let a = catalog.transaction(1, 42, 26_000_000, 0);
        assert_eq!(a, catalog.transaction(1, 42, 26_000_000, 0));
        assert_eq!(a.len(), TXN_COLUMNS.len());
        assert_ne!(a, catalog.transaction(1, 42, 26_000_000, 3));
    }
}
