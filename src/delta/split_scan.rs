//! Reading a table with deletion vectors on every core, when [`super::vector_scan`] cannot (its files
//! do not hold its columns as they are: partition columns, column mapping). delta-rs 1.1 scans files
//! that carry deletion vectors in one partition, in file order, without pushing filters into the
//! Parquet reader (so that each row keeps its position for its vector). Such a table is read here as
//! a union of scans, each over its own share of the files: each share is still read in order, but
//! the shares are read side by side. Without it, each of Gold's slices over a Silver with deletion
//! vectors took half again as long as over one without.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::{
    arrow::datatypes::SchemaRef,
    catalog::{Session, TableProvider},
    datasource::TableType,
    error::Result,
    logical_expr::{Expr, TableProviderFilterPushDown},
    physical_plan::{ExecutionPlan, union::UnionExec},
};
use deltalake::DeltaTable;

use super::DeltaError;
use crate::storage::Location;

/// A provider reading `table` as a union of scans over shares of its files, when some file has a
/// deletion vector and there are cores and files to share; `None` otherwise.
pub(super) async fn split(
    path: &Location,
    table: &DeltaTable,
) -> Result<Option<Arc<dyn TableProvider>>, DeltaError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let Some(shares) = shares(path, table, cores)? else {
        return Ok(None);
    };
    let mut parts: Vec<Arc<dyn TableProvider>> = Vec::with_capacity(shares.len());
    for share in shares {
        let scan = table
            .table_provider()
            .with_file_paths(share)
            .build()
            .await
            .map_err(|e| DeltaError::query(path, e))?;
        parts.push(Arc::new(scan));
    }
    Ok(Some(Arc::new(SplitScan { parts })))
}

/// The table's files (scan ids) in `cores` shares of about equal bytes, when some file has a
/// deletion vector and there are at least two files and two cores.
fn shares(
    path: &Location,
    table: &DeltaTable,
    cores: usize,
) -> Result<Option<Vec<Vec<String>>>, DeltaError> {
    if cores < 2 {
        return Ok(None);
    }
    let snapshot = table.snapshot().map_err(|e| DeltaError::table(path, e))?;
    if !super::vector_scan::has_deletion_vectors(snapshot) {
        return Ok(None);
    }
    let root = super::files::root_url(table);
    let mut files = Vec::new();
    for view in snapshot.log_data() {
        let id = super::files::scan_id(path, &root, &view.path())?;
        files.push((view.size(), id.to_string()));
    }
    if files.len() < 2 {
        return Ok(None);
    }
    Ok(Some(balance(files, cores)))
}

/// `files` (size, item) dealt into at most `count` shares of about equal size: largest first (in
/// their order among equals), each to the lightest share.
pub(super) fn balance<T>(mut files: Vec<(i64, T)>, count: usize) -> Vec<Vec<T>> {
    files.sort_by_key(|file| std::cmp::Reverse(file.0));
    let count = count.min(files.len()).max(1);
    let mut shares: Vec<(i64, Vec<T>)> = (0..count).map(|_| (0, Vec::new())).collect();
    for (size, item) in files {
        if let Some(lightest) = shares.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            lightest.0 += size;
            lightest.1.push(item);
        }
    }
    shares.into_iter().map(|(_, items)| items).collect()
}

/// The union of scans of one table's snapshot over disjoint shares of its files.
#[derive(Debug)]
struct SplitScan {
    /// At least one; all with the same schema (one snapshot).
    parts: Vec<Arc<dyn TableProvider>>,
}

#[async_trait]
impl TableProvider for SplitScan {
    fn schema(&self) -> SchemaRef {
        self.parts[0].schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Every part applies a filter as the first does: they are scans of one snapshot.
        self.parts[0].supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plans = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            plans.push(part.scan(state, projection, filters, limit).await?);
        }
        UnionExec::try_new(plans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_dealt_largest_first_to_the_lightest_share() {
        let files = |sizes: &[i64]| {
            sizes
                .iter()
                .enumerate()
                .map(|(i, s)| (*s, format!("f{i}")))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            balance(files(&[10, 60, 30, 50]), 2),
            [vec!["f1", "f0"], vec!["f3", "f2"]]
        );
        // Never more shares than files, and every file in one share.
        let shared = balance(files(&[5, 5, 5]), 8);
        assert_eq!(shared.len(), 3);
        let mut all: Vec<String> = shared.concat();
        all.sort();
        assert_eq!(all, ["f0", "f1", "f2"]);
    }
}
