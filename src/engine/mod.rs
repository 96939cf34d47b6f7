//! DataFusion: the query session a stage runs in (UDFs, `bronze`/`silver`/`gold` schemas, the tables it
//! reads), and stage SQL files. Reading only: commits belong to `delta/`.

pub mod scratch;
pub mod sql;
pub mod udf;

use std::sync::Arc;

use datafusion::{
    catalog::{MemorySchemaProvider, TableProvider},
    error::DataFusionError,
    prelude::{DataFrame, SessionContext, col, lit},
};

use crate::config::TableName;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what}: {}", source.message())]
    Query {
        what: String,
        source: DataFusionError,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

impl EngineError {
    pub fn query(what: impl Into<String>, source: DataFusionError) -> EngineError {
        EngineError::Query {
            what: what.into(),
            source,
        }
    }
}

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing happens); returns whether
/// they are off. A query's hash tables and buffers grow by reallocation, and the first touch of a huge
/// page zeroes (and may compact memory for) 2 MiB at once: with them on, the kernel spent half the CPU
/// of a Gold aggregation over 10M rows zeroing pages, and the incremental benchmark had twice the
/// system time (BENCHMARKS.md, item 25).
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: both calls take integers only and touch no memory of the process; on a kernel
        // without them (before 3.15) they fail, and the process keeps the system's default.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// mimalloc v3's option number of `purge_delay` (`mi_option_purge_delay` in its `mimalloc.h`, which
/// libmimalloc-sys 0.1.49 does not name); a test checks that it holds v3's default, 1000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has the allocator (mimalloc) return memory freed for `delay_ms` milliseconds to the system.
fn purge_freed_memory_after(delay_ms: u32) {
    // SAFETY: sets one integer option; mimalloc reads options atomically and allows changes at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay_ms.into()) }
}

/// How long freed memory stays with the allocator, unless `MIMALLOC_PURGE_DELAY` says: mimalloc v3's
/// second, or 10 ms when the run's memory is limited (`--memory-limit`: the user chose memory over
/// speed). Each page handed back is faulted in again at its next use, which costs system time (much of
/// it on a VM whose balloon driver reports freed pages to the host). On the 10M benchmarks a second
/// against 100 ms: ingest 11.0 s against 11.9 s, the incremental run 11.4 s against 12.3 s, peaks 70–230
/// MiB higher (0.85 GiB for ingest and Gold in one run); 10 ms: 12% slower than 100 ms, the incremental
/// peak a sixth lower (BENCHMARKS.md, items 30 and 38).
pub fn tune_allocator(memory_limited: bool) {
    if memory_limited && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        purge_freed_memory_after(10);
    }
}

/// Prepares `ctx` for stage SQL: medallion's UDFs are registered.
pub fn prepare(ctx: &SessionContext) {
    udf::register_all(ctx);
}

/// Registers `provider` as `schema.table`, optionally only the rows with `batch_column > after`.
pub fn register_table(
    ctx: &SessionContext,
    name: &TableName,
    provider: Arc<dyn TableProvider>,
    only_after: Option<(&str, i64)>,
) -> Result<(), EngineError> {
    let what = || format!("cannot register table `{name}`");
    let catalog = ctx.catalog("datafusion").ok_or_else(|| {
        EngineError::query(
            what(),
            DataFusionError::Internal("no default catalog".into()),
        )
    })?;
    if catalog.schema(&name.schema).is_none() {
        catalog
            .register_schema(&name.schema, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| EngineError::query(what(), e))?;
    }
    let reference = name.to_string();
    match only_after {
        None => ctx.register_table(reference.as_str(), provider),
        Some((column, after)) => {
            let increment = ctx
                .read_table(provider)
                .and_then(|df| df.filter(col(column).gt(lit(after))))
                .map_err(|e| EngineError::query(what(), e))?;
            ctx.register_table(reference.as_str(), increment.into_view())
        }
    }
    .map(|_| ())
    .map_err(|e| EngineError::query(what(), e))
}

/// Plans one SELECT.
pub async fn query(ctx: &SessionContext, what: &str, sql: &str) -> Result<DataFrame, EngineError> {
    ctx.sql(sql)
        .await
        .map_err(|e| EngineError::query(what.to_string(), e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_mimallocs_and_takes_a_new_value() {
        // SAFETY: reads and sets integer options only.
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(
                get(),
                1000,
                "not mimalloc v3's purge_delay (default 1000 ms)"
            );
        }
        super::purge_freed_memory_after(10);
        assert_eq!(get(), 10);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_for_the_process_once_disabled() {
        assert!(super::disable_transparent_huge_pages());
        // The kernel's own view, where it shows one (Linux 5.0 and later).
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }
}
