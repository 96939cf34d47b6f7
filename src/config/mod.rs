//! Pipeline configuration: YAML text → `${VAR}` interpolation → serde spec (`spec.rs`, unknown keys are
//! errors) → checked model (`validate.rs` → `model.rs`). Every problem is reported at once, each with the
//! file and line it comes from. `medallion validate` runs exactly this code.

mod env;
pub mod model;
mod spec;
mod validate;

use std::{
    fmt,
    path::{Path, PathBuf},
};

pub use model::*;

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: Option<usize>,
    pub message: String,
}

impl Issue {
    pub fn at(line: usize, message: impl Into<String>) -> Issue {
        Issue {
            line: Some(line),
            message: message.into(),
        }
    }

    pub fn general(message: impl Into<String>) -> Issue {
        Issue {
            line: None,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pipeline file `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_issues(path, issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

fn render_issues(path: &Path, issues: &[Issue]) -> String {
    let count = issues.len();
    let mut out = format!(
        "pipeline `{}` is invalid ({count} problem{}):",
        path.display(),
        if count == 1 { "" } else { "s" }
    );
    for issue in issues {
        match issue.line {
            Some(line) => {
                out.push_str(&format!("\n  {}:{line}: {}", path.display(), issue.message))
            }
            None => out.push_str(&format!("\n  {}: {}", path.display(), issue.message)),
        }
    }
    out
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Loads and validates the pipeline at `path`, with `${VAR}` taken from the process environment.
pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
    load_with_vars(path, &std::collections::BTreeMap::new())
}

/// As [`load`], with `vars` added to (and overriding) the pipeline's `vars:` (`--vars`, `--date`).
pub fn load_with_vars(
    path: &Path,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<Pipeline, ConfigError> {
    load_with_env(path, |name| std::env::var(name).ok(), vars)
}

/// As [`load_with_vars`], with an explicit environment (tests).
pub fn load_with_env(
    path: &Path,
    lookup: impl Fn(&str) -> Option<String>,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_text(path, &text, lookup, vars)
}

/// Validates `text` as the pipeline file at `path` (SQL files are looked up beside it), exactly as
/// [`load_with_env`] does after reading the file.
pub fn load_text(
    path: &Path,
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<Pipeline, ConfigError> {
    let invalid = |issues| ConfigError::Invalid {
        path: path.to_path_buf(),
        issues,
    };
    let text = env::interpolate(text, lookup).map_err(invalid)?;
    let pipeline = validate::compile(path, &text, vars).map_err(invalid)?;
    Ok(pipeline)
}
