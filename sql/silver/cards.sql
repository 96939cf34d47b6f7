-- New DMS change rows of bronze.cards, typed; the card number keeps its last 4 digits and the CVV is dropped.
SELECT
    TRY_CAST(id AS BIGINT)                           AS card_id,
    TRY_CAST(client_id AS BIGINT)                    AS client_id,
    NULLIF(TRIM(card_brand), '')                     AS card_brand,
    NULLIF(TRIM(card_type), '')                      AS card_type,
    card_last4(card_number)                          AS card_last4,
    parse_month(expires)                             AS expires,
    UPPER(TRIM(has_chip)) = 'YES'                    AS has_chip,
    TRY_CAST(num_cards_issued AS INT)                AS num_cards_issued,
    parse_money(credit_limit)                        AS credit_limit,
    parse_month(acct_open_date)                      AS acct_open_date,
    TRY_CAST(year_pin_last_changed AS INT)           AS year_pin_last_changed,
    UPPER(TRIM(card_on_dark_web)) = 'YES'            AS card_on_dark_web,
    parse_ts(dms_commit_ts)                          AS _commit_ts,
    _source_file,
    _file_order,
    _source_row,
    COALESCE(op, 'I')                                AS _op
FROM bronze.cards
