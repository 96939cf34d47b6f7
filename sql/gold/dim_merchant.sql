-- The merchant dimension: each merchant's latest location and category, with the MCC description.
SELECT
    m.merchant_id,
    m.merchant_city,
    m.merchant_state,
    m.zip,
    m.mcc,
    c.description                                    AS mcc_description,
    m.merchant_city = 'ONLINE'                       AS is_online
FROM (
    SELECT
        merchant_id, merchant_city, merchant_state, zip, mcc,
        ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY txn_ts DESC, dms_id DESC) AS rank
    FROM silver.transactions
) m
LEFT JOIN silver.mcc_codes c ON c.mcc = m.mcc
WHERE m.rank = 1
