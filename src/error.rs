//! The crate error: one enum gathering each subsystem's errors, and the one place where an error becomes a
//! process exit code.

use crate::{
    config::ConfigError, delta::DeltaError, engine::EngineError, generate::GenerateError,
    landing::LandingError, runner::RunError, state::StateError, storage::StorageError,
};

/// Everything that can go wrong in medallion, by subsystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error(transparent)]
    Delta(Box<DeltaError>),
    #[error(transparent)]
    Storage(Box<StorageError>),
    #[error(transparent)]
    Landing(Box<LandingError>),
    #[error(transparent)]
    State(Box<StateError>),
    #[error(transparent)]
    Run(Box<RunError>),
    #[error(transparent)]
    Generate(Box<GenerateError>),
    #[error(transparent)]
    Lake(Box<crate::lake::LakeError>),
    #[error(transparent)]
    Maintain(Box<crate::maintain::MaintainError>),
    #[error("{0}")]
    Usage(String),
}

/// Subsystem errors are boxed so that `Result<T>` stays small on the happy path.
macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for Error {
            fn from(error: $ty) -> Self {
                Error::$variant(Box::new(error))
            }
        }
    )*};
}

boxed_from!(
    Config(ConfigError),
    Engine(EngineError),
    Delta(DeltaError),
    Storage(StorageError),
    Landing(LandingError),
    State(StateError),
    Run(RunError),
    Generate(GenerateError),
    Lake(crate::lake::LakeError),
    Maintain(crate::maintain::MaintainError),
);

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
    /// Another run of the same pipeline holds the run lock; nothing was read or written.
    pub const LOCKED: u8 = 4;
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => exit_code::INVALID,
            Error::Storage(e)
                if matches!(
                    **e,
                    StorageError::InvalidLocation { .. } | StorageError::UnsafeOption { .. }
                ) =>
            {
                exit_code::INVALID
            }
            Error::Lake(e) if matches!(**e, crate::lake::LakeError::UnknownTable { .. }) => {
                exit_code::INVALID
            }
            Error::Run(e)
                if matches!(
                    **e,
                    crate::runner::RunError::Lock(crate::runner::lock::LockError::Held { .. })
                ) =>
            {
                exit_code::LOCKED
            }
            Error::Run(e)
                if matches!(
                    **e,
                    crate::runner::RunError::Storage(StorageError::UnsafeOption { .. })
                ) =>
            {
                exit_code::INVALID
            }
            Error::Maintain(e)
                if matches!(
                    **e,
                    crate::maintain::MaintainError::Lock(
                        crate::runner::lock::LockError::Held { .. }
                    )
                ) =>
            {
                exit_code::LOCKED
            }
            Error::Maintain(e)
                if matches!(
                    **e,
                    crate::maintain::MaintainError::RetentionTooShort { .. }
                        | crate::maintain::MaintainError::Storage(
                            StorageError::UnsafeOption { .. }
                        )
                ) =>
            {
                exit_code::INVALID
            }
            _ => exit_code::ERROR,
        }
    }
}
