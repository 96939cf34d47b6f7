-- New DMS change rows of bronze.users, typed; money columns as DECIMAL(18,2).
SELECT
    TRY_CAST(id AS BIGINT)                           AS user_id,
    TRY_CAST(current_age AS INT)                     AS current_age,
    TRY_CAST(retirement_age AS INT)                  AS retirement_age,
    TRY_CAST(birth_year AS INT)                      AS birth_year,
    TRY_CAST(birth_month AS INT)                     AS birth_month,
    NULLIF(TRIM(gender), '')                         AS gender,
    NULLIF(TRIM(address), '')                        AS address,
    TRY_CAST(latitude AS DOUBLE)                     AS latitude,
    TRY_CAST(longitude AS DOUBLE)                    AS longitude,
    parse_money(per_capita_income)                   AS per_capita_income,
    parse_money(yearly_income)                       AS yearly_income,
    parse_money(total_debt)                          AS total_debt,
    TRY_CAST(credit_score AS INT)                    AS credit_score,
    TRY_CAST(num_credit_cards AS INT)                AS num_credit_cards,
    parse_ts(dms_commit_ts)                          AS _commit_ts,
    _source_file,
    _file_order,
    _source_row,
    COALESCE(op, 'I')                                AS _op
FROM bronze.users
