//! medallion: a batch medallion ETL engine. One YAML file defines a DAG of stages that land AWS DMS files
//! in Bronze, type and merge them into Silver, and build Gold facts, dimensions and KPIs, all as Delta
//! tables.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! config  (YAML → validated Pipeline)      dag     (pure graph: order, cycles, ready queue)
//!    │                                        │
//!    └──────────────► runner ◄────────────────┘   orchestration: plan → run stages → report
//!                       │
//!        ┌──────────────┼───────────────┬──────────────┐
//!     landing        engine           delta          checks / state
//!  (DMS files →   (DataFusion SQL,  (Delta writes:   (expectations; ingest ledger,
//!   raw batches)   UDFs)             append, over-     stage watermarks and run
//!                                    write, merge,     history under <lake>/_medallion)
//!                                    cdc)
//!        └──────────────┴───────┬───────┴──────────────┘
//!                            storage  (local folder or s3://bucket/prefix: locations, options,
//!                                      the conditional-write preflight, actionable errors)
//! ```
//!
//! `engine` never commits to Delta, `delta` never parses YAML, `dag` never does I/O.

pub mod checks;
pub mod cli;
pub mod config;
pub mod crash;
pub mod dag;
pub mod delta;
pub mod engine;
pub mod error;
pub mod generate;
pub mod lake;
pub mod landing;
pub mod maintain;
pub mod notify;
pub mod runner;
pub mod state;
pub mod storage;

pub use error::{Error, Result};
