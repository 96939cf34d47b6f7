//! Compiles the serde spec into the checked [`Pipeline`] model, collecting every problem with its line.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    Issue,
    model::*,
    spec::{self, PipelineSpec},
};
use crate::{
    dag::Graph,
    engine::sql,
    storage::{Location, Storage},
};

/// At most this many unknown keys are reported from one file before giving up.
const MAX_UNKNOWN_KEYS: usize = 50;

pub(super) fn compile(
    path: &Path,
    text: &str,
    overrides: &BTreeMap<String, String>,
) -> Result<Pipeline, Vec<Issue>> {
    let mut issues = Vec::new();
    let Some(mut spec) = parse_spec(text, &mut issues) else {
        return Err(issues);
    };
    spec.vars
        .extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    let lines = Lines::new(text);
    let project_dir = project_dir(path);
    let pipeline = Compiler {
        lines: &lines,
        project_dir: &project_dir,
        issues: &mut issues,
        storage: Arc::default(),
    }
    .pipeline(path, spec);
    match pipeline {
        Some(pipeline) if issues.is_empty() => Ok(pipeline),
        _ => {
            issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
            Err(issues)
        }
    }
}

/// SQL and relative paths are resolved against the project directory: the parent of a `pipelines/`
/// folder, otherwise the folder of the YAML file.
fn project_dir(path: &Path) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new(""));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    if parent.file_name().is_some_and(|n| n == "pipelines") {
        parent
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    } else {
        parent.to_path_buf()
    }
}

/// Deserializes the spec. An unknown key is reported, its block cut from the text, and parsing retried,
/// so that every misspelled key in the file shows up in one report.
fn parse_spec(text: &str, issues: &mut Vec<Issue>) -> Option<PipelineSpec> {
    let mut text = text.to_string();
    for _ in 0..MAX_UNKNOWN_KEYS {
        let error = match serde_yaml::from_str::<PipelineSpec>(&text) {
            Ok(spec) => return Some(spec),
            Err(error) => error,
        };
        let message = yaml_message(&error);
        let line = error.location().map(|l| l.line());
        issues.push(Issue {
            line,
            message: message.clone(),
        });
        let (Some(location), true) = (error.location(), message.contains("unknown field")) else {
            return None;
        };
        text = cut_block(&text, location.line(), location.column());
    }
    None
}

/// serde_yaml's message without its trailing ` at line L column C` (the line is reported separately),
/// with a "did you mean" for a misspelled key.
fn yaml_message(error: &serde_yaml::Error) -> String {
    let message = error.to_string();
    let message = match message.rfind(" at line ") {
        Some(pos) => message[..pos].to_string(),
        None => message,
    };
    match suggest_key(&message) {
        Some(suggestion) => format!("{message} (did you mean `{suggestion}`?)"),
        None => message,
    }
}

/// For ``unknown field `keyz`, expected one of `a`, `keys` ``, the expected key closest to the unknown one.
fn suggest_key(message: &str) -> Option<&str> {
    let rest = message.split_once("unknown field `")?.1;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (edit_distance(unknown, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// What is wrong with the tables a check's `query` reads, if anything: it must parse as one SELECT, and a
/// table without a layer must be one the check is given ([`crate::checks::RELATIONS`]). Tables named
/// `layer.table` are found when the stage runs (another pipeline may write them to the same lake).
fn check_tables(query: &str) -> Option<String> {
    let tables = match sql::table_references(query) {
        Ok(tables) => tables,
        Err(message) => return Some(format!("query `{query}`: {message}")),
    };
    let relations = crate::checks::RELATIONS;
    let unknown = tables
        .iter()
        .find(|t| !t.contains('.') && !relations.contains(&t.as_str()))?;
    let closest = relations
        .iter()
        .map(|r| (edit_distance(unknown, r), r))
        .filter(|(distance, r)| *distance <= 2.max(r.len() / 3))
        .min_by_key(|(distance, _)| *distance);
    let hint = match closest {
        Some((_, r)) => format!(" (did you mean `{r}`?)"),
        None => String::new(),
    };
    Some(format!(
        "reads unknown table `{unknown}`{hint}: a check reads {}, or a pipeline table as `layer.table`",
        relations.map(|r| format!("`{r}`")).join(", ")
    ))
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Removes the mapping entry whose key starts at (`line`, `column`), 1-based, with its nested block.
/// Removed lines stay as blank lines so later line numbers stay right. A list marker in front of the key
/// (`- sqll: x`) moves to the item's next key.
fn cut_block(text: &str, line: usize, column: usize) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let key_indent = column.saturating_sub(1);
    let Some(first) = line.checked_sub(1).filter(|&i| i < lines.len()) else {
        return text.to_string();
    };
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let mut end = first + 1;
    while end < lines.len() {
        let next = &lines[end];
        let trimmed = next.trim_start();
        let nested = trimmed.is_empty()
            || trimmed.starts_with('#')
            || indent_of(next) > key_indent
            || (indent_of(next) == key_indent && trimmed.starts_with("- "));
        if !nested {
            break;
        }
        end += 1;
    }
    let prefix: String = lines[first].chars().take(key_indent).collect();
    for l in &mut lines[first..end] {
        l.clear();
    }
    if !prefix.trim().is_empty() {
        match lines.get_mut(end) {
            Some(next) if indent_of(next) == key_indent => {
                *next = format!("{prefix}{}", next.trim_start());
            }
            _ => lines[first] = format!("{prefix}{{}}"),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Finds the lines where YAML keys and values appear, for error messages.
struct Lines<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        Lines {
            lines: text.lines().collect(),
        }
    }

    /// 1-based line of the first `key: value` at or after line `from`.
    fn find(&self, from: usize, key: &str, value: &str) -> Option<usize> {
        let start = from.saturating_sub(1);
        self.lines
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, line)| {
                let body = line.trim_start().trim_start_matches("- ").trim_start();
                body.strip_prefix(key)
                    .and_then(|rest| rest.trim_start().strip_prefix(':'))
                    .map(|rest| {
                        let v = rest.split(" #").next().unwrap_or("").trim();
                        v.trim_matches('"').trim_matches('\'') == value
                    })
                    .unwrap_or(false)
            })
            .map(|(index, _)| index + 1)
    }
}

struct Compiler<'a> {
    lines: &'a Lines<'a>,
    project_dir: &'a Path,
    issues: &'a mut Vec<Issue>,
    /// The pipeline's `storage:` options, which every location it names carries.
    storage: Arc<Storage>,
}

impl Compiler<'_> {
    fn issue(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.issues.push(Issue {
            line,
            message: message.into(),
        });
    }

    fn resolve(&self, path: &str) -> PathBuf {
        // An absolute path replaces the project directory in `join`.
        crate::storage::clean_path(&self.project_dir.join(path))
    }

    /// A local path (relative to the project), `file://` or `s3://` location; `what` names it in issues.
    fn location(&mut self, text: &str, key: &str, what: &str) -> Location {
        match Location::parse(text, self.project_dir, self.storage.clone()) {
            Ok(location) => location,
            Err(e) => {
                let line = self.lines.find(1, key, text);
                self.issue(line, format!("{what}: {e}"));
                Location::local(self.resolve("."))
            }
        }
    }

    fn storage(&mut self, spec: Option<spec::StorageSpec>) -> Storage {
        let Some(spec) = spec else {
            return Storage::default();
        };
        let mut options = BTreeMap::new();
        for (name, value) in spec.options {
            if value.is_empty() {
                continue;
            }
            options.insert(name.to_ascii_lowercase(), value);
        }
        let mut set = |key: &str, value: Option<String>| {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                options.insert(key.to_string(), value);
            }
        };
        set("aws_endpoint", spec.endpoint);
        set("aws_region", spec.region);
        set("aws_allow_http", spec.allow_http.map(|b| b.to_string()));
        set(
            "aws_virtual_hosted_style_request",
            Some((!spec.path_style.unwrap_or(true)).to_string()),
        );
        set("max_retries", spec.max_retries.map(|n| n.to_string()));
        set(
            "retry_timeout",
            spec.retry_timeout_secs.map(|n| format!("{n}s")),
        );
        if let Err(e) = deltalake::logstore::StorageConfig::parse_options(options.clone()) {
            let line = self.lines.find(1, "storage", "");
            self.issue(line, format!("storage: {e}"));
        }
        Storage::new(options, spec.allow_unsafe_writes)
    }

    fn pipeline(&mut self, path: &Path, spec: PipelineSpec) -> Option<Pipeline> {
        if spec.name.trim().is_empty() {
            let line = self.lines.find(1, "name", "");
            self.issue(line, "`name` must not be empty");
        }
        self.storage = Arc::new(self.storage(spec.storage));
        let lake = self.location(spec.lake.as_deref().unwrap_or("./lake"), "lake", "`lake`");
        let sources = self.sources(spec.sources);
        let stages = self.stages(spec.stages, &sources, &spec.vars);
        let graph = self.graph(&stages);
        let notify = self.notify(spec.notify);
        let maintenance = self.maintenance(spec.maintenance);
        Some(Pipeline {
            name: spec.name,
            description: spec.description,
            file: path.to_path_buf(),
            project_dir: self.project_dir.to_path_buf(),
            lake,
            vars: spec.vars,
            sources,
            stages: stages.into_iter().map(|(s, _, _)| s).collect(),
            graph: graph?,
            notify,
            maintenance,
        })
    }

    fn maintenance(&mut self, spec: Option<spec::MaintenanceSpec>) -> Maintenance {
        let defaults = Maintenance::default();
        let Some(spec) = spec else {
            return defaults;
        };
        let time_travel_days = spec.time_travel_days.unwrap_or(defaults.time_travel_days);
        let backfill_days = spec.backfill_days.unwrap_or(defaults.backfill_days);
        let minimum = time_travel_days.max(backfill_days);
        let vacuum_retention_days = spec.vacuum_retention_days.unwrap_or(minimum);
        if vacuum_retention_days < minimum {
            let line = self.lines.find(
                1,
                "vacuum_retention_days",
                &vacuum_retention_days.to_string(),
            );
            self.issue(
                line,
                format!(
                    "maintenance: `vacuum_retention_days: {vacuum_retention_days}` is shorter than the time-travel \
                     ({time_travel_days} days) and backfill ({backfill_days} days) windows the pipeline promises; \
                     vacuum would delete files those need"
                ),
            );
        }
        Maintenance {
            time_travel_days,
            backfill_days,
            vacuum_retention_days,
            target_file_bytes: spec.target_file_mb.unwrap_or(128).max(1) * 1024 * 1024,
            optimize_after_files: spec
                .optimize_after_files
                .unwrap_or(defaults.optimize_after_files),
        }
    }

    fn notify(&mut self, specs: Vec<spec::NotifySpec>) -> Vec<NotifyTarget> {
        let mut targets = Vec::new();
        let mut from = 1;
        for spec in specs {
            let line = self.lines.find(from, "name", &spec.name);
            from = line.map_or(from, |l| l + 1);
            let name = spec.name.clone();
            let on = spec
                .on
                .unwrap_or_else(|| vec!["success".into(), "failure".into()]);
            for event in &on {
                if event != "success" && event != "failure" {
                    self.issue(
                        line,
                        format!(
                            "notify `{name}`: `on` value `{event}` must be `success` or `failure`"
                        ),
                    );
                }
            }
            let kind = match (spec.webhook, spec.sns) {
                (Some(webhook), None) => {
                    if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://"))
                    {
                        self.issue(
                            line,
                            format!(
                                "notify `{name}`: webhook `url` must start with http:// or https://"
                            ),
                        );
                    }
                    NotifyKind::Webhook(WebhookTarget {
                        url: webhook.url,
                        headers: webhook.headers.into_iter().collect(),
                        secret_env: webhook.secret_env,
                        timeout: std::time::Duration::from_secs(
                            webhook.timeout_secs.unwrap_or(10).max(1),
                        ),
                        retries: webhook.retries.unwrap_or(3),
                        backoff: std::time::Duration::from_millis(
                            webhook.backoff_ms.unwrap_or(500),
                        ),
                    })
                }
                (None, Some(sns)) => {
                    if !sns.topic_arn.starts_with("arn:") {
                        self.issue(line, format!("notify `{name}`: sns `topic_arn` must be an ARN (`arn:aws:sns:<region>:<account>:<topic>`)"));
                    }
                    NotifyKind::Sns(SnsTarget {
                        topic_arn: sns.topic_arn,
                        region: sns.region,
                        endpoint_url: sns.endpoint_url,
                    })
                }
                _ => {
                    self.issue(
                        line,
                        format!("notify `{name}`: give exactly one of `webhook` and `sns`"),
                    );
                    continue;
                }
            };
            targets.push(NotifyTarget {
                name,
                on,
                required: spec.required,
                kind,
            });
        }
        targets
    }

    fn sources(&mut self, specs: Vec<spec::SourceSpec>) -> Vec<Source> {
        let mut seen = BTreeSet::new();
        let mut sources = Vec::new();
        for spec in specs {
            let line = self.lines.find(1, "name", &spec.name);
            if !seen.insert(spec.name.clone()) {
                self.issue(line, format!("source `{}` is defined twice", spec.name));
            }
            if spec.columns.is_empty() {
                self.issue(
                    line,
                    format!(
                        "source `{}`: `columns` must list the table's columns",
                        spec.name
                    ),
                );
            }
            let mut names = BTreeSet::new();
            for column in &spec.columns {
                if !names.insert(column) {
                    self.issue(
                        line,
                        format!("source `{}`: column `{column}` is listed twice", spec.name),
                    );
                }
            }
            for key in &spec.key {
                if !names.contains(key) {
                    self.issue(
                        line,
                        format!(
                            "source `{}`: key column `{key}` is not in `columns`",
                            spec.name
                        ),
                    );
                }
            }
            let delimiter = spec.delimiter.unwrap_or(',');
            if !delimiter.is_ascii() {
                self.issue(
                    line,
                    format!(
                        "source `{}`: delimiter must be one ASCII character",
                        spec.name
                    ),
                );
            }
            let format = match spec.format {
                Some(spec::FormatSpec::Parquet) => FileFormat::Parquet,
                Some(spec::FormatSpec::Json) => FileFormat::Json,
                Some(spec::FormatSpec::Csv) | None => FileFormat::Csv,
            };
            if format == FileFormat::Json && spec.dms.is_some() {
                self.issue(
                    line,
                    format!(
                        "source `{}`: `dms` needs CSV or Parquet files (JSON sources are lookup files)",
                        spec.name
                    ),
                );
            }
            let path = self.location(
                &spec.path,
                "path",
                &format!("source `{}`: `path`", spec.name),
            );
            sources.push(Source {
                path,
                format,
                header: spec.header.unwrap_or(true),
                delimiter: delimiter as u8,
                columns: spec.columns,
                key: spec.key,
                dms: spec.dms.map(|d| DmsLayout {
                    timestamp_column: d.timestamp_column,
                    include_op_for_full_load: d.include_op_for_full_load,
                    change_seq: d.change_seq,
                }),
                on_bad_file: match spec.on_bad_file {
                    Some(spec::BadFileSpec::Quarantine) => BadFilePolicy::Quarantine,
                    Some(spec::BadFileSpec::Skip) => BadFilePolicy::Skip,
                    Some(spec::BadFileSpec::Fail) | None => BadFilePolicy::Fail,
                },
                name: spec.name,
            });
        }
        sources
    }

    /// Compiles the stages; each comes with its line and its explicit `depends_on`.
    fn stages(
        &mut self,
        specs: Vec<spec::StageSpec>,
        sources: &[Source],
        vars: &BTreeMap<String, String>,
    ) -> Vec<(Stage, usize, Vec<String>)> {
        let mut stages = Vec::new();
        let mut names = BTreeSet::new();
        let mut targets: HashMap<TableName, String> = HashMap::new();
        let mut from = 1;
        for spec in specs {
            let line = self.lines.find(from, "name", &spec.name).unwrap_or(from);
            from = line + 1;
            let at = Some(line);
            let name = spec.name.clone();
            if !names.insert(name.clone()) {
                self.issue(at, format!("stage `{name}` is defined twice"));
            }
            let target = match TableName::parse(&spec.target) {
                Some(target) => target,
                None => {
                    let line = self.lines.find(line, "target", &spec.target).or(at);
                    self.issue(
                        line,
                        format!(
                            "stage `{name}`: target `{}` must be `layer.table` in lower case (e.g. `silver.transactions`)",
                            spec.target
                        ),
                    );
                    continue;
                }
            };
            if let Some(other) = targets.insert(target.clone(), name.clone()) {
                let line = self.lines.find(line, "target", &spec.target).or(at);
                self.issue(
                    line,
                    format!(
                        "stage `{name}`: target `{target}` is already written by stage `{other}`"
                    ),
                );
            }
            let Some((input, by_date)) = self.stage_input(&spec, line, sources, vars) else {
                continue;
            };
            let Some(write) = self.write_mode(&spec, &input, line) else {
                continue;
            };
            let checks = self.checks(&name, at, &spec.checks);
            if let Some(columns) = &spec.stats_columns {
                let mut seen = std::collections::BTreeSet::new();
                let problem = if columns.is_empty() {
                    Some("is empty; remove it to keep statistics for every column".to_string())
                } else if let Some(bad) = columns
                    .iter()
                    .find(|c| c.trim().is_empty() || c.contains(','))
                {
                    Some(format!("lists `{bad}`, which is not a column name"))
                } else {
                    columns
                        .iter()
                        .find(|c| !seen.insert(c.as_str()))
                        .map(|twice| format!("lists `{twice}` twice"))
                };
                if let Some(problem) = problem {
                    self.issue(at, format!("stage `{name}`: `stats_columns` {problem}"));
                }
            }
            let compression = spec.compression.as_deref().and_then(|text| {
                text.parse::<crate::delta::Codec>()
                    .map_err(|problem| {
                        self.issue(at, format!("stage `{name}`: `compression`: {problem}"))
                    })
                    .ok()
            });
            let keyed = spec
                .incremental
                .as_ref()
                .is_some_and(|inc| inc.key.is_some());
            match &write {
                _ if !spec.deletion_vectors => {}
                WriteMode::Cdc { keys, .. } if keys.len() == 1 => {}
                WriteMode::Overwrite if keyed => {}
                WriteMode::Cdc { .. } => self.issue(
                    at,
                    format!(
                        "stage `{name}`: `deletion_vectors` needs one key column (an integer): \
                         rows of other keys are not marked"
                    ),
                ),
                _ => self.issue(
                    at,
                    format!(
                        "stage `{name}`: `deletion_vectors` needs mode `cdc`, or `incremental.key` \
                         (only a change batch marks rows deleted)"
                    ),
                ),
            }
            let incremental = match &spec.incremental {
                None => None,
                Some(inc) => {
                    let source = TableName::parse(&inc.source);
                    if source.is_none() {
                        self.issue(
                            at,
                            format!(
                                "stage `{name}`: incremental source `{}` must be `layer.table`",
                                inc.source
                            ),
                        );
                    }
                    if !matches!(write, WriteMode::Overwrite) {
                        self.issue(
                            at,
                            format!("stage `{name}`: `incremental` needs mode `overwrite`"),
                        );
                    }
                    let by = match (&inc.column, &inc.key) {
                        (Some(column), None) => Some(IncrementalBy::Column(column.clone())),
                        (None, Some(_)) if by_date => {
                            self.issue(
                                at,
                                format!(
                                    "stage `{name}`: `incremental.key` recomputes only the keys whose source rows \
                                     changed, so its SQL must give the same row whatever the run's \
                                     date; it reads `$logical_date`, `$start` or `$end` (use \
                                     `incremental.column`, or no date variable)"
                                ),
                            );
                            None
                        }
                        (None, Some(key)) if spec.deletion_vectors => {
                            Some(IncrementalBy::Key(key.clone()))
                        }
                        (None, Some(_)) => {
                            self.issue(
                                at,
                                format!(
                                    "stage `{name}`: `incremental.key` needs `deletion_vectors: \
                                     true` (the rows of changed keys are marked deleted where they \
                                     are; without deletion vectors every file holding one would \
                                     be rewritten)"
                                ),
                            );
                            None
                        }
                        _ => {
                            self.issue(
                                at,
                                format!(
                                    "stage `{name}`: `incremental` needs one of `column` (recompute \
                                     the touched values of a column) and `key` (recompute the rows \
                                     of changed keys)"
                                ),
                            );
                            None
                        }
                    };
                    source
                        .zip(by)
                        .map(|(source, by)| Incremental { by, source })
                }
            };
            let expectations = spec
                .expectations
                .into_iter()
                .map(|e| Expectation {
                    name: e.name,
                    expr: e.expr,
                    column: e.column,
                    action: match e.action {
                        Some(spec::ActionSpec::Warn) => ExpectationAction::Warn,
                        Some(spec::ActionSpec::Drop) => ExpectationAction::Drop,
                        Some(spec::ActionSpec::Quarantine) => ExpectationAction::Quarantine,
                        Some(spec::ActionSpec::Fail) | None => ExpectationAction::Fail,
                    },
                })
                .collect();
            stages.push((
                Stage {
                    name,
                    layer: match spec.layer {
                        spec::LayerSpec::Bronze => Layer::Bronze,
                        spec::LayerSpec::Silver => Layer::Silver,
                        spec::LayerSpec::Gold => Layer::Gold,
                    },
                    description: spec.description,
                    input,
                    target,
                    write,
                    partition_by: spec.partition_by,
                    expectations,
                    checks,
                    zorder_by: spec.zorder_by,
                    column_comments: spec.column_comments,
                    stats_columns: spec.stats_columns,
                    compression,
                    incremental,
                    deletion_vectors: spec.deletion_vectors,
                },
                line,
                spec.depends_on,
            ));
        }
        self.link_incremental(&mut stages);
        // Every table a SQL stage reads must be written by some stage of this pipeline.
        for (stage, line, _) in &stages {
            if let StageInput::Sql { file, reads, .. } = &stage.input {
                for table in reads {
                    if !targets.contains_key(table) {
                        let known: Vec<String> = targets.keys().map(ToString::to_string).collect();
                        let mut known = known;
                        known.sort();
                        self.issue(
                            Some(*line),
                            format!(
                                "stage `{}`: sql file `{}` reads unknown table `{table}` (tables of this pipeline: {})",
                                stage.name,
                                file.strip_prefix(self.project_dir).unwrap_or(file).display(),
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        stages
    }

    fn stage_input(
        &mut self,
        spec: &spec::StageSpec,
        line: usize,
        sources: &[Source],
        vars: &BTreeMap<String, String>,
    ) -> Option<(StageInput, bool)> {
        let name = &spec.name;
        match (&spec.sql, &spec.ingest) {
            (Some(_), Some(_)) | (None, None) => {
                self.issue(
                    Some(line),
                    format!("stage `{name}`: set exactly one of `sql` (a SQL file) or `ingest` (a source)"),
                );
                None
            }
            (None, Some(source)) => {
                if !sources.iter().any(|s| &s.name == source) {
                    let line = self.lines.find(line, "ingest", source).unwrap_or(line);
                    let known: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                    self.issue(
                        Some(line),
                        format!(
                            "stage `{name}`: ingests unknown source `{source}` (sources: {})",
                            known.join(", ")
                        ),
                    );
                    return None;
                }
                Some((
                    StageInput::Ingest {
                        source: source.clone(),
                    },
                    false,
                ))
            }
            (Some(sql_path), None) => {
                let sql_line = self.lines.find(line, "sql", sql_path).unwrap_or(line);
                let file = self.resolve(sql_path);
                let raw = match std::fs::read_to_string(&file) {
                    Ok(raw) => raw,
                    Err(error) => {
                        let what = if error.kind() == std::io::ErrorKind::NotFound {
                            "not found".to_string()
                        } else {
                            format!("cannot be read: {error}")
                        };
                        self.issue(
                            Some(sql_line),
                            format!("stage `{name}`: sql file `{sql_path}` {what}"),
                        );
                        return None;
                    }
                };
                let text = match sql::substitute_vars(&raw, vars) {
                    Ok(text) => text,
                    Err(missing) => {
                        self.issue(
                            Some(sql_line),
                            format!(
                                "stage `{name}`: sql file `{sql_path}` uses `{{{{ {missing} }}}}` but `vars` has no `{missing}`"
                            ),
                        );
                        return None;
                    }
                };
                let references = match sql::table_references(&text) {
                    Ok(references) => references,
                    Err(error) => {
                        self.issue(
                            Some(sql_line),
                            format!(
                                "stage `{name}`: sql file `{sql_path}` is not valid SQL: {error}"
                            ),
                        );
                        return None;
                    }
                };
                let mut reads = Vec::new();
                for reference in references {
                    match TableName::parse(&reference) {
                        Some(table) => {
                            if !reads.contains(&table) {
                                reads.push(table);
                            }
                        }
                        None => self.issue(
                            Some(sql_line),
                            format!(
                                "stage `{name}`: sql file `{sql_path}` reads `{reference}`; name tables as `layer.table` (e.g. `silver.transactions`)"
                            ),
                        ),
                    }
                }
                let by_date = sql::uses_date_vars(&raw, vars);
                Some((StageInput::Sql { file, text, reads }, by_date))
            }
        }
    }

    fn write_mode(
        &mut self,
        spec: &spec::StageSpec,
        input: &StageInput,
        line: usize,
    ) -> Option<WriteMode> {
        let name = &spec.name;
        let ingest = matches!(input, StageInput::Ingest { .. });
        let mode = spec.mode.unwrap_or(if ingest {
            spec::ModeSpec::Append
        } else {
            spec::ModeSpec::Overwrite
        });
        let mut ok = true;
        let mut require = |this: &mut Self, cond: bool, message: String| {
            if !cond {
                this.issue(Some(line), message);
                ok = false;
            }
        };
        require(
            self,
            !ingest || matches!(mode, spec::ModeSpec::Append),
            format!(
                "stage `{name}`: an ingest stage lands files append-only; remove `mode` or set `mode: append`"
            ),
        );
        let needs_keys = matches!(mode, spec::ModeSpec::Merge | spec::ModeSpec::Cdc);
        require(
            self,
            !needs_keys || !spec.keys.is_empty(),
            format!("stage `{name}`: mode `merge`/`cdc` needs `keys` (e.g. `keys: [dms_id]`)"),
        );
        require(
            self,
            needs_keys || spec.keys.is_empty(),
            format!("stage `{name}`: `keys` is only used by mode `merge` or `cdc`"),
        );
        let cdc = matches!(mode, spec::ModeSpec::Cdc);
        require(
            self,
            !cdc || !spec.sequence_by.is_empty(),
            format!(
                "stage `{name}`: mode `cdc` needs `sequence_by` (e.g. `sequence_by: [_commit_ts]`)"
            ),
        );
        require(
            self,
            cdc || (spec.sequence_by.is_empty() && spec.op.is_none()),
            format!("stage `{name}`: `sequence_by` and `op` are only used by mode `cdc`"),
        );
        if !ok {
            return None;
        }
        Some(match mode {
            spec::ModeSpec::Append => WriteMode::Append,
            spec::ModeSpec::Overwrite => WriteMode::Overwrite,
            spec::ModeSpec::Merge => WriteMode::Merge {
                keys: spec.keys.clone(),
            },
            spec::ModeSpec::Cdc => {
                let (op_column, delete_values) = match &spec.op {
                    Some(op) if !op.delete.is_empty() => (op.column.clone(), op.delete.clone()),
                    Some(op) => (op.column.clone(), vec!["D".to_string()]),
                    None => ("_op".to_string(), vec!["D".to_string()]),
                };
                WriteMode::Cdc {
                    keys: spec.keys.clone(),
                    sequence_by: spec.sequence_by.clone(),
                    op_column,
                    delete_values,
                    track: Vec::new(),
                }
            }
        })
    }

    /// Compiles a stage's KPI and reconciliation checks.
    fn checks(&mut self, stage: &str, at: Option<usize>, specs: &[spec::CheckSpec]) -> Vec<Check> {
        use std::str::FromStr;
        let mut checks = Vec::new();
        for spec in specs {
            let name = &spec.name;
            let rule = match (&spec.expect, &spec.equals, &spec.max_change_pct) {
                (Some(expect), None, None) => parse_expect(expect),
                (None, Some(query), None) => spec
                    .tolerance
                    .as_deref()
                    .map(|t| {
                        rust_decimal::Decimal::from_str(t.trim())
                            .map_err(|_| format!("tolerance `{t}` is not a number"))
                    })
                    .transpose()
                    .map(|tolerance| CheckRule::Equals {
                        query: query.clone(),
                        tolerance: tolerance.unwrap_or_default().abs(),
                    }),
                (None, None, Some(pct)) => rust_decimal::Decimal::from_str(pct.trim())
                    .map(CheckRule::MaxChangePct)
                    .map_err(|_| format!("max_change_pct `{pct}` is not a number")),
                _ => Err("give exactly one of `expect`, `equals` and `max_change_pct`".to_string()),
            };
            let mut queries = vec![spec.query.as_str()];
            if let Some(query) = &spec.equals {
                queries.push(query);
            }
            for query in queries {
                if let Some(message) = check_tables(query) {
                    let line = self.lines.find(at.unwrap_or(1), "name", name).or(at);
                    self.issue(line, format!("stage `{stage}`: check `{name}`: {message}"));
                }
            }
            match rule {
                Ok(rule) => checks.push(Check {
                    name: name.clone(),
                    query: spec.query.clone(),
                    rule,
                    severity: match spec.severity {
                        Some(spec::SeveritySpec::Warn) => Severity::Warn,
                        Some(spec::SeveritySpec::Error) | None => Severity::Error,
                    },
                }),
                Err(message) => {
                    let line = self.lines.find(at.unwrap_or(1), "name", name).or(at);
                    self.issue(line, format!("stage `{stage}`: check `{name}`: {message}"));
                }
            }
        }
        checks
    }

    /// Checks each incremental stage against the cdc stage of its source, and makes that cdc stage record
    /// the touched values of the column.
    fn link_incremental(&mut self, stages: &mut [(Stage, usize, Vec<String>)]) {
        let wanted: Vec<(String, usize, Incremental, bool)> = stages
            .iter()
            .filter_map(|(stage, line, _)| {
                let inc = stage.incremental.clone()?;
                let reads = stage.reads().contains(&inc.source);
                Some((stage.name.clone(), *line, inc, reads))
            })
            .collect();
        for (name, line, inc, reads) in wanted {
            if !reads {
                self.issue(
                    Some(line),
                    format!(
                        "stage `{name}`: incremental source `{}` is not a table its SQL reads",
                        inc.source
                    ),
                );
                continue;
            }
            let writer = stages
                .iter_mut()
                .find(|(s, _, _)| s.target == inc.source)
                .map(|(s, _, _)| &mut s.write);
            match (writer, &inc.by) {
                (Some(WriteMode::Cdc { track, .. }), IncrementalBy::Column(column)) => {
                    if !track.contains(column) {
                        track.push(column.clone());
                    }
                }
                (Some(WriteMode::Cdc { keys, .. }), IncrementalBy::Key(_)) if keys.len() == 1 => {}
                (Some(WriteMode::Cdc { .. }), IncrementalBy::Key(_)) => self.issue(
                    Some(line),
                    format!(
                        "stage `{name}`: `incremental.key` needs its source `{}` to have one key \
                         column (an integer)",
                        inc.source
                    ),
                ),
                (Some(_), _) => self.issue(
                    Some(line),
                    format!(
                        "stage `{name}`: incremental source `{}` must be written by a `cdc` stage, which records the values its changes touch",
                        inc.source
                    ),
                ),
                (None, _) => {} // reported as an unknown table below
            }
        }
    }

    /// Edges from each table's writer to its readers, plus `depends_on`; a cycle is reported as a path.
    fn graph(&mut self, stages: &[(Stage, usize, Vec<String>)]) -> Option<Graph> {
        let index: HashMap<&str, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, (s, _, _))| (s.name.as_str(), i))
            .collect();
        let writer: HashMap<&TableName, usize> = stages
            .iter()
            .enumerate()
            .map(|(i, (s, _, _))| (&s.target, i))
            .collect();
        let mut graph = Graph::new(stages.len());
        for (i, (stage, line, depends_on)) in stages.iter().enumerate() {
            for table in stage.reads() {
                if let Some(&from) = writer.get(table) {
                    graph.add_edge(from, i);
                }
            }
            for dependency in depends_on.iter() {
                match index.get(dependency.as_str()) {
                    Some(&from) => graph.add_edge(from, i),
                    None => self.issue(
                        Some(*line),
                        format!(
                            "stage `{}`: `depends_on` names unknown stage `{dependency}`",
                            stage.name
                        ),
                    ),
                }
            }
        }
        if let Some(cycle) = graph.find_cycle() {
            let path: Vec<&str> = cycle.iter().map(|&i| stages[i].0.name.as_str()).collect();
            let line = stages[cycle[0]].1;
            self.issue(
                Some(line),
                format!("stages form a cycle: {}", path.join(" -> ")),
            );
            return None;
        }
        Some(graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_block_removes_nested_lines_and_keeps_numbering() {
        let text = "a: 1\nbogus:\n  - x\n  - y\nb: 2\n";
        assert_eq!(cut_block(text, 2, 1), "a: 1\n\n\n\nb: 2\n");
        let text = "stages:\n  - name: s\n    sqll: x.sql\n    layer: gold\n";
        assert_eq!(
            cut_block(text, 3, 5),
            "stages:\n  - name: s\n\n    layer: gold\n"
        );
        let text = "stages:\n  - sqll: x.sql\n    name: s\n";
        assert_eq!(cut_block(text, 2, 5), "stages:\n\n  - name: s\n");
    }

    #[test]
    fn misspelled_keys_get_a_suggestion() {
        let message =
            "stages[1]: unknown field `keyz`, expected one of `name`, `keys`, `sequence_by`";
        assert_eq!(suggest_key(message), Some("keys"));
        let message = "unknown field `sequence`, expected one of `name`, `keys`, `sequence_by`";
        assert_eq!(suggest_key(message), Some("sequence_by"));
        let message = "unknown field `zzzzzz`, expected one of `name`, `keys`";
        assert_eq!(suggest_key(message), None);
    }

    #[test]
    fn a_check_reads_its_own_tables_or_pipeline_tables_and_a_misspelling_gets_a_suggestion() {
        for fine in [
            "SELECT COUNT(*) FROM changed",
            "SELECT COUNT(*) FROM candidate c JOIN batch b ON c.k = b.k",
            "WITH t AS (SELECT 1 AS x) SELECT COUNT(*) FROM t, silver.transactions",
        ] {
            assert_eq!(check_tables(fine), None, "{fine}");
        }
        let message = check_tables("SELECT COUNT(*) FROM chnged").unwrap();
        assert!(
            message.contains("unknown table `chnged` (did you mean `changed`?)"),
            "{message}"
        );
        let message = check_tables("SELECT COUNT(*) FROM transactions").unwrap();
        assert!(
            message.contains("unknown table `transactions`: a check reads"),
            "{message}"
        );
        assert!(message.contains("`layer.table`"), "{message}");
        let message = check_tables("SELECT COUNT(*) FROM").unwrap();
        assert!(
            message.starts_with("query `SELECT COUNT(*) FROM`: "),
            "{message}"
        );
    }

    #[test]
    fn project_dir_is_parent_of_pipelines_folder() {
        assert_eq!(project_dir(Path::new("pipelines/t.yaml")), Path::new("."));
        assert_eq!(
            project_dir(Path::new("/p/pipelines/t.yaml")),
            Path::new("/p")
        );
        assert_eq!(
            project_dir(Path::new("/p/other/t.yaml")),
            Path::new("/p/other")
        );
        assert_eq!(project_dir(Path::new("t.yaml")), Path::new("."));
    }
}
