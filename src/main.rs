//! The `medallion` binary: parse the command line, set up logging, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The allocator's own setting, when given, decides instead.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        medallion::engine::disable_transparent_huge_pages();
    }
    let cli = medallion::cli::Cli::parse();
    medallion::cli::init_tracing(&cli);
    match medallion::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
