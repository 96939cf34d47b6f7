//! Stage SQL files: `{{ var }}` substitution and the table references of a statement, resolved by
//! DataFusion's own parser without executing anything (used to infer the DAG's edges).

use std::collections::BTreeMap;

use datafusion::sql::{
    parser::{DFParser, Statement},
    resolve::resolve_table_references,
    sqlparser::ast,
};

/// Replaces each `{{ name }}` with the pipeline variable `name` as written, and each `$name` of a known
/// variable with it as an SQL string literal (a parameter: `WHERE txn_date >= $start`); returns the first
/// unknown `{{ name }}`.
pub fn substitute_vars(sql: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let sql = substitute_braces(sql, vars)?;
    Ok(substitute_parameters(&sql, vars))
}

fn substitute_parameters(sql: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '$' {
            let rest = &sql[i + 1..];
            let len = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            if let Some(value) = vars.get(name).filter(|_| !name.is_empty()) {
                out.push('\'');
                out.push_str(&value.replace('\'', "''"));
                out.push('\'');
                for _ in 0..name.chars().count() {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn substitute_braces(sql: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(after.trim().to_string());
        };
        let name = after[..end].trim();
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => return Err(name.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The variables a run's date sets (`run --date`, each date of a backfill).
pub const DATE_VARS: [&str; 3] = ["logical_date", "start", "end"];

/// Whether `sql` reads a variable a run's date sets ([`DATE_VARS`]): its text, with `vars`, differs
/// between two dates.
pub fn uses_date_vars(sql: &str, vars: &BTreeMap<String, String>) -> bool {
    let on = |date: &str| {
        let mut vars = vars.clone();
        for name in DATE_VARS {
            vars.insert(name.to_string(), date.to_string());
        }
        substitute_vars(sql, &vars).ok()
    };
    on("1970-01-01") != on("1970-01-02")
}

/// The tables a single SELECT reads, as written (`silver.transactions`), CTE names excluded.
pub fn table_references(sql: &str) -> Result<Vec<String>, String> {
    let mut statements = DFParser::parse_sql(sql).map_err(|e| e.strip_backtrace())?;
    if statements.len() != 1 {
        return Err(format!(
            "expected exactly one SELECT statement, found {}",
            statements.len()
        ));
    }
    let Some(statement) = statements.pop_front() else {
        return Err("the file holds no SQL statement".into());
    };
    let Statement::Statement(inner) = &statement else {
        return Err("expected a SELECT statement".into());
    };
    if !matches!(inner.as_ref(), ast::Statement::Query(_)) {
        return Err(
            "expected a SELECT statement (write modes such as MERGE or INSERT belong in the pipeline YAML)"
                .into(),
        );
    }
    let (tables, _ctes) =
        resolve_table_references(&statement, true).map_err(|e| e.strip_backtrace())?;
    Ok(tables.iter().map(ToString::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_reading_a_date_variable_is_told_from_sql_that_does_not() {
        let vars = BTreeMap::from([("region".to_string(), "eu".to_string())]);
        for dated in [
            "SELECT * FROM t WHERE d >= $start",
            "SELECT * FROM t WHERE d < '{{ end }}'",
            "SELECT {{logical_date}} AS d FROM t",
        ] {
            assert!(uses_date_vars(dated, &vars), "{dated}");
        }
        for undated in [
            "SELECT * FROM t",
            "SELECT * FROM t WHERE r = $region AND x = '{{ region }}'",
            "SELECT $starting, $ends FROM t",
        ] {
            assert!(!uses_date_vars(undated, &vars), "{undated}");
        }
    }

    #[test]
    fn finds_tables_but_not_ctes() {
        let sql = "WITH d AS (SELECT * FROM silver.transactions) \
                   SELECT * FROM d JOIN silver.cards c ON d.card_id = c.id";
        assert_eq!(
            table_references(sql).unwrap(),
            vec![
                "silver.cards".to_string(),
                "silver.transactions".to_string()
            ]
        );
    }

    #[test]
    fn rejects_non_select_and_bad_sql() {
        assert!(
            table_references("DELETE FROM silver.t")
                .unwrap_err()
                .contains("SELECT")
        );
        assert!(table_references("SELEC 1").is_err());
        assert!(
            table_references("SELECT 1; SELECT 2")
                .unwrap_err()
                .contains("exactly one")
        );
    }

    #[test]
    fn substitutes_vars() {
        let vars = BTreeMap::from([("limit".to_string(), "1000".to_string())]);
        assert_eq!(
            substitute_vars("x >= {{ limit }} AND y", &vars).unwrap(),
            "x >= 1000 AND y"
        );
        assert_eq!(substitute_vars("{{nope}}", &vars).unwrap_err(), "nope");
        let dates = BTreeMap::from([("start".to_string(), "2019-10-01".to_string())]);
        assert_eq!(
            substitute_vars("d >= $start AND x = '$12' AND $other", &dates).unwrap(),
            "d >= '2019-10-01' AND x = '$12' AND $other"
        );
    }
}
