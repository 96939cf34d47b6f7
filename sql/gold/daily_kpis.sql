-- One row per transaction date of silver.transactions: counts, money totals (to the cent) and channel mix.
SELECT
    txn_date,
    COUNT(*)                                                            AS txn_count,
    CAST(COALESCE(SUM(amount), 0) AS DECIMAL(18, 2))                    AS total_amount,
    COUNT(*) FILTER (WHERE amount < 0)                                  AS refund_count,
    CAST(COALESCE(-SUM(amount) FILTER (WHERE amount < 0), 0) AS DECIMAL(18, 2)) AS refund_amount,
    COUNT(errors)                                                       AS error_count,
    COUNT(*) FILTER (WHERE channel = 'ONLINE')                          AS online_count,
    COUNT(DISTINCT card_id)                                             AS distinct_cards
FROM silver.transactions
GROUP BY txn_date
ORDER BY txn_date
