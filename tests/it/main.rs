//! End-to-end tests: the real `medallion` binary on generated DMS files, real Delta tables on disk, real
//! Python Delta readers. One test binary, one module per area.

mod airflow;
mod bad_input;
mod cdc_property;
mod cdc_reference;
mod common;
mod concurrency;
mod crash;
mod end_to_end;
mod interop;
mod ledger;
mod malformed;
mod notify;
mod python_reader;
mod quality;
mod resources;
mod robustness;
mod s3;
mod schedule;
mod upkeep;
mod validate;
