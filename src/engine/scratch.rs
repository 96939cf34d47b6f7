//! A stage's scratch space: query results written once to local Arrow IPC files and read back as
//! tables. A stage reads its output several times (expectations, the split into kept and quarantined
//! rows, the cdc steps); materialized here, the expensive plan behind it (file scans, parsing UDFs) runs
//! once, and the rows wait in the page cache rather than in the process's memory.

use std::{fs::File, io::BufWriter, path::PathBuf};

use datafusion::{
    arrow::ipc::writer::FileWriter,
    datasource::file_format::options::ArrowReadOptions,
    error::DataFusionError,
    prelude::{DataFrame, SessionContext},
};
use futures::StreamExt;

use super::EngineError;

/// Environment variable naming the directory scratch files go under (default: the system's temp dir).
pub const SCRATCH_DIR_ENV: &str = "MEDALLION_SCRATCH_DIR";

/// A directory of materialized results, removed with everything in it when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new directory under `$MEDALLION_SCRATCH_DIR`, or the system's temp dir.
    pub fn new() -> Result<Scratch, EngineError> {
        let parent = std::env::var_os(SCRATCH_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let invalid = |e: std::io::Error| EngineError::Invalid {
            what: format!(
                "cannot create a scratch directory under {}",
                parent.display()
            ),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&parent).map_err(invalid)?;
        let dir = tempfile::Builder::new()
            .prefix("medallion-")
            .tempdir_in(&parent)
            .map_err(invalid)?;
        Ok(Scratch { dir })
    }

    /// Runs `frame`, writes its result as one file per partition (the partitions run in parallel) and
    /// registers it in `ctx` as `name`; returns its row count. `name` must be new to this scratch.
    pub async fn materialize(
        &self,
        ctx: &SessionContext,
        name: &str,
        frame: DataFrame,
    ) -> Result<u64, EngineError> {
        let what = || format!("materializing `{name}`");
        let err = |e: DataFusionError| EngineError::query(what(), e);
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).map_err(|e| err(e.into()))?;
        let streams = frame.execute_stream_partitioned().await.map_err(err)?;
        let Some(schema) = streams.first().map(|s| s.schema()) else {
            return Err(err(DataFusionError::Internal(
                "a plan without partitions".into(),
            )));
        };
        let mut writers = Vec::with_capacity(streams.len());
        for (index, mut stream) in streams.into_iter().enumerate() {
            let file = dir.join(format!("part-{index}.arrow"));
            // Each partition on its own task, so that the partitions' plans run on all workers. The file
            // writes are buffered writes to local disk, short enough to make in place.
            writers.push(tokio::spawn(async move {
                let mut writer =
                    FileWriter::try_new(BufWriter::new(File::create(&file)?), &stream.schema())?;
                let mut rows = 0u64;
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    rows += batch.num_rows() as u64;
                    writer.write(&batch)?;
                }
                writer.finish()?;
                Ok::<u64, DataFusionError>(rows)
            }));
        }
        let mut rows = 0;
        for writer in writers {
            rows += writer
                .await
                .map_err(|e| err(DataFusionError::External(Box::new(e))))?
                .map_err(err)?;
        }
        let location = format!("{}/", dir.display());
        let options = ArrowReadOptions {
            schema: Some(schema.as_ref()),
            ..ArrowReadOptions::default()
        };
        ctx.register_arrow(name, &location, options)
            .await
            .map_err(err)?;
        Ok(rows)
    }

    /// The scratch directory (for tests and diagnostics).
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_is_read_back_unchanged_and_removed_with_the_scratch() {
        let ctx = SessionContext::new();
        let scratch = Scratch::new().unwrap();
        let frame = ctx
            .sql(
                "SELECT v AS id, CAST(v AS DECIMAL(18,2)) AS amount, \
                 CASE WHEN v % 3 = 0 THEN NULL ELSE CAST(v AS VARCHAR) END AS label \
                 FROM generate_series(1, 10000) AS t(v)",
            )
            .await
            .unwrap();
        let planned = frame.schema().as_arrow().clone();
        assert_eq!(scratch.materialize(&ctx, "t", frame).await.unwrap(), 10_000);
        let table = ctx.table("t").await.unwrap();
        assert_eq!(
            table.schema().as_arrow().fields().len(),
            planned.fields().len()
        );
        let sums = ctx
            .sql("SELECT COUNT(*), SUM(amount), COUNT(label), SUM(id) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let row = &sums[0];
        assert_eq!(
            row.column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            10_000
        );
        let amount =
            datafusion::arrow::util::display::array_value_to_string(row.column(1), 0).unwrap();
        assert_eq!(amount, "50005000.00");
        assert_eq!(
            row.column(2)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            6_667
        );
        let dir = scratch.path().to_path_buf();
        assert!(dir.join("t").is_dir());
        drop(scratch);
        assert!(!dir.exists(), "the scratch directory outlived its owner");
    }
}
