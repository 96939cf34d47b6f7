//! `${VAR}` and `${VAR:-default}` interpolation of the pipeline text from the environment, before YAML
//! parsing, so every value (paths, endpoints, secrets) can come from the environment. `$$` is a literal `$`.
//! Values never contain the text of other variables: interpolation is one pass.

use super::Issue;

/// Replaces every `${...}` in `text` using `lookup`; unset variables without default are reported with
/// their line, all at once.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<Issue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    issues.push(Issue::at(
                        line_no,
                        "unterminated `${` (write `$$` for a literal `$`)",
                    ));
                    out.push_str(&rest[pos..]);
                    rest = "";
                    break;
                };
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (expr, None),
                };
                if !is_var_name(name) {
                    issues.push(Issue::at(
                        line_no,
                        format!("`${{{expr}}}` is not a valid variable reference (use `${{NAME}}` or `${{NAME:-default}}`)"),
                    ));
                } else {
                    match (lookup(name).filter(|v| !v.is_empty()), default) {
                        (Some(value), _) => out.push_str(&value),
                        (None, Some(default)) => out.push_str(default),
                        (None, None) => issues.push(Issue::at(
                            line_no,
                            format!("environment variable `{name}` is not set (set it, or write `${{{name}:-default}}`)"),
                        )),
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "LAKE" => Some("/data/lake".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_values_and_defaults() {
        let text = "lake: ${LAKE}\nland: ${LAND:-./landing}\nx: ${EMPTY:-d}\nprice: $$5 and $x\n";
        assert_eq!(
            interpolate(text, env).unwrap(),
            "lake: /data/lake\nland: ./landing\nx: d\nprice: $5 and $x\n"
        );
    }

    #[test]
    fn reports_every_unset_variable_with_its_line() {
        let issues = interpolate("a: ${A}\nb: ok\nc: ${C} ${bad-name}\n", env).unwrap_err();
        let lines: Vec<_> = issues.iter().map(|i| (i.line, i.message.clone())).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].0, Some(1));
        assert!(lines[0].1.contains("`A` is not set"));
        assert_eq!(lines[1].0, Some(3));
        assert!(lines[2].1.contains("not a valid variable reference"));
    }
}
