-- The card dimension (no card number beyond its last 4 digits, no CVV).
SELECT
    card_id,
    client_id                                        AS user_id,
    card_brand,
    card_type,
    card_last4,
    expires,
    has_chip,
    num_cards_issued,
    credit_limit,
    acct_open_date,
    year_pin_last_changed,
    card_on_dark_web
FROM silver.cards
