-- The transaction fact of the star schema: one row per live transaction, keyed to its dimensions.
SELECT
    dms_id                                           AS transaction_id,
    txn_ts,
    txn_date,
    CAST(date_part('year', txn_date) AS INT)         AS txn_year,
    card_id,
    client_id                                        AS user_id,
    merchant_id,
    mcc,
    amount,
    channel,
    is_refund,
    amount_category,
    errors,
    errors IS NOT NULL                               AS has_errors
FROM silver.transactions
