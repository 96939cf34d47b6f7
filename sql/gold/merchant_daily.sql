-- Transactions and money per merchant and day.
SELECT
    merchant_id,
    txn_date,
    COUNT(*)                                         AS txn_count,
    CAST(COALESCE(SUM(amount), 0) AS DECIMAL(18, 2)) AS total_amount
FROM silver.transactions
GROUP BY merchant_id, txn_date

