-- The date dimension: every date present in silver.transactions.
SELECT
    txn_date                                         AS date,
    CAST(date_part('year', txn_date) AS INT)         AS year,
    CAST(date_part('quarter', txn_date) AS INT)      AS quarter,
    CAST(date_part('month', txn_date) AS INT)        AS month,
    CAST(date_part('day', txn_date) AS INT)          AS day,
    CAST(date_part('dow', txn_date) AS INT)          AS day_of_week,
    to_char(txn_date, '%A')                          AS day_name,
    date_part('dow', txn_date) IN (0, 6)             AS is_weekend
FROM (SELECT DISTINCT txn_date FROM silver.transactions)
ORDER BY date
