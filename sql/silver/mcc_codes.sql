-- Merchant category codes from the new rows of bronze.mcc_codes; the latest description per code wins.
SELECT mcc, description, _source_file
FROM (
    SELECT
        TRY_CAST(mcc AS INT)                         AS mcc,
        NULLIF(TRIM(description), '')                AS description,
        _source_file,
        ROW_NUMBER() OVER (PARTITION BY mcc ORDER BY _file_order DESC, _source_row DESC) AS rank
    FROM bronze.mcc_codes
)
WHERE rank = 1
