-- New DMS change rows of bronze.transactions, typed per the contract; the cdc write keeps the last per dms_id.
SELECT
    TRY_CAST(id AS BIGINT)                           AS dms_id,
    parse_ts(date)                                   AS txn_ts,
    CAST(parse_ts(date) AS DATE)                     AS txn_date,
    TRY_CAST(client_id AS BIGINT)                    AS client_id,
    TRY_CAST(card_id AS BIGINT)                      AS card_id,
    parse_money(amount)                              AS amount,
    parse_channel(use_chip)                          AS channel,
    TRY_CAST(merchant_id AS BIGINT)                  AS merchant_id,
    NULLIF(TRIM(merchant_city), '')                  AS merchant_city,
    NULLIF(TRIM(merchant_state), '')                 AS merchant_state,
    parse_zip(zip)                                   AS zip,
    TRY_CAST(mcc AS INT)                             AS mcc,
    NULLIF(TRIM(errors), '')                         AS errors,
    parse_money(amount) < 0                          AS is_refund,
    CASE
        WHEN abs(parse_money(amount)) >= {{ high_value }} THEN 'high_value'
        WHEN abs(parse_money(amount)) >= {{ medium_value }} THEN 'medium_value'
        ELSE 'standard'
    END                                              AS amount_category,
    parse_ts(dms_commit_ts)                          AS _commit_ts,
    _source_file,
    _file_order,
    _source_row,
    COALESCE(op, 'I')                                AS _op
FROM bronze.transactions
