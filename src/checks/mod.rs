//! Data quality gates, run on a stage's candidate result before anything is published: row-level
//! expectations (warn, drop, quarantine, fail), KPI and reconciliation checks, and the quarantine table
//! that keeps rejected rows with their reasons.

mod expectations;
mod kpi;
mod partials;
mod quarantine;

pub use expectations::{Evaluation, ExpectationResult, Split, evaluate, split};
pub use kpi::{
    BATCH, CANDIDATE, CHANGED, CheckResult, RELATIONS, Reads, columns_read,
    evaluate as evaluate_checks,
};
pub use partials::{Partials, Swept, folder as partials_folder, sweep_folder};
pub use quarantine::{quarantine_table, write_quarantine};
