//! The crate error: one enum gathering each subsystem's errors, and the one place where an error becomes a
//! process exit code.

use crate::{
    config::ConfigError, delta::DeltaError, engine::EngineError, generate::GenerateError,
    landing::LandingError, runner::RunError, state::StateError,
};

/// Everything that can go wrong in medallion, by subsystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error(transparent)]
    Landing(#[from] LandingError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Documented exit codes (see README, "Exit codes").
pub mod exit_code {
    /// The run finished and every stage succeeded (or had nothing to do).
    pub const SUCCESS: u8 = 0;
    /// The run started but a stage failed; tables downstream of it were left untouched.
    pub const RUN_FAILED: u8 = 1;
    /// The pipeline file or the command line is invalid; nothing was read or written.
    pub const INVALID: u8 = 2;
    /// An I/O, storage or internal error outside any stage.
    pub const ERROR: u8 = 3;
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => exit_code::INVALID,
            _ => exit_code::ERROR,
        }
    }
}
