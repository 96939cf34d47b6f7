//! Data quality checks run on a stage's candidate output before anything is committed.

mod expectations;

pub use expectations::{ExpectationResult, evaluate};
