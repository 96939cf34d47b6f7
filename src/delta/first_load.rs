//! A cdc table's first load, written as the stage computes it. A first load compares with nothing (no
//! live rows, no tombstones): when it also changes each key once, every change that is not a delete is
//! an insert, so its rows can go to the table's files in the pass that computes them, and only a narrow
//! copy (keys, sequences, op, what the checks read) is kept for the cdc steps, which classify and check
//! it before the files are published ([`super::PreparedChanges::commit`]) or removed
//! ([`super::PreparedChanges::discard`]). The general path instead keeps the whole result in scratch
//! files and writes it after, reading it again.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::AsArray,
        compute::filter_record_batch,
        datatypes::{Schema, SchemaRef},
    },
    physical_plan::{SendableRecordBatchStream, stream::RecordBatchStreamAdapter},
    prelude::{DataFrame, ident},
};
use futures::StreamExt;

use super::{
    DeltaError, TableOptions, create_if_missing,
    files::{FileStats, Layout, Written},
    quote,
};
use crate::{
    delta::cdc::{CdcSpec, clustered, collect_keys, holds_files},
    engine::udf::repeated::{is_integer_key, repeated_keys},
    storage::Location,
};

/// A first load about to be written: its table (`None` until it is created, when the load is
/// prepared), its columns and how its files are laid out.
pub struct FirstLoad {
    path: Location,
    table: Option<deltalake::DeltaTable>,
    layout: Layout,
    /// The table's columns: the stage's output without the op column.
    stored: SchemaRef,
    /// The table's options, its key not null.
    options: TableOptions,
}

/// A first load's files, written and not yet committed.
pub struct StagedLoad {
    pub(super) table: Option<deltalake::DeltaTable>,
    pub(super) written: Written,
    pub(super) stored: SchemaRef,
    pub(super) options: TableOptions,
}

impl FirstLoad {
    /// The first load of `output` into the cdc table at `path`, when it may be written as it is
    /// computed: the table and its tombstones hold no files, at most one column is tracked, the key is
    /// one integer column, never NULL, and no key occurs twice in `output`. `None`
    /// otherwise, to go the general way. Finding out reads the key column alone (its bounds lay out
    /// the files).
    pub async fn plan(
        path: &Location,
        output: &DataFrame,
        spec: &CdcSpec,
        options: &TableOptions,
    ) -> Result<Option<FirstLoad>, DeltaError> {
        let query = |e| DeltaError::query(path, e);
        let schema = output.schema().as_arrow().clone();
        let [key] = spec.keys.as_slice() else {
            return Ok(None);
        };
        let key_field = match schema.field_with_name(key) {
            Ok(field) if is_integer_key(field.data_type()) => field.clone(),
            _ => return Ok(None),
        };
        let missing = spec
            .sequence_by
            .iter()
            .chain(&spec.track)
            .chain(std::iter::once(&spec.op_column))
            .any(|c| schema.field_with_name(c).is_err());
        // A missing column is reported by the general path, in its words.
        if spec.track.len() > 1 || missing {
            return Ok(None);
        }
        let table = super::open(path).await?;
        if table.as_ref().is_some_and(holds_files)
            || super::open(&spec.tombstones)
                .await?
                .is_some_and(|t| holds_files(&t))
        {
            return Ok(None);
        }
        let stream = output
            .clone()
            .select(vec![ident(key)])
            .map_err(query)?
            .execute_stream()
            .await
            .map_err(query)?;
        let (keys, nulls) = collect_keys(stream).await.map_err(query)?;
        let rows = (keys.len() + nulls) as u64;
        let bounds = keys.iter().min().zip(keys.iter().max());
        let bounds = bounds.map(|(low, high)| (low.to_string(), high.to_string()));
        // A NULL key is quarantined or fails the write: either way the general path reports it.
        if nulls > 0 || !repeated_keys(keys).is_empty() {
            return Ok(None);
        }
        let stored: Vec<_> = schema
            .fields()
            .iter()
            .filter(|f| f.name() != &spec.op_column)
            .cloned()
            .collect();
        let stored = Arc::new(Schema::new(stored));
        let mut table_options = options.clone();
        table_options.not_null.push(key_field.name().clone());
        let layout = clustered(
            spec,
            &table_options,
            &bounds,
            None,
            rows,
            &FileStats::default(),
        );
        Ok(Some(FirstLoad {
            path: path.clone(),
            table,
            layout,
            stored,
            options: table_options,
        }))
    }

    /// Writes the rows of `streams` (batches of the stage's output plus a boolean column `keep`) that
    /// `keep` holds true for, as the table's files, uncommitted. The streams' other columns go
    /// elsewhere (see [`crate::engine::scratch::tee`]) as they are read.
    pub async fn write(
        self,
        streams: Vec<SendableRecordBatchStream>,
        keep: &str,
    ) -> Result<StagedLoad, DeltaError> {
        let FirstLoad {
            path,
            table,
            layout,
            stored,
            options,
        } = self;
        let query = |e| DeltaError::query(&path, e);
        let mut kept = Vec::with_capacity(streams.len());
        for stream in streams {
            let schema = stream.schema();
            let mask = schema.index_of(keep).map_err(|e| query(e.into()))?;
            let columns = stored
                .fields()
                .iter()
                .map(|f| schema.index_of(f.name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| query(e.into()))?;
            let projected = Arc::new(schema.project(&columns).map_err(|e| query(e.into()))?);
            let name = quote(keep);
            let rows = stream.map(move |batch| {
                let batch = batch?;
                let keep = batch.column(mask).as_boolean_opt().ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal(format!(
                        "column {name} is not a boolean"
                    ))
                })?;
                Ok(filter_record_batch(&batch.project(&columns)?, keep)?)
            });
            kept.push(Box::pin(RecordBatchStreamAdapter::new(projected, rows)) as _);
        }
        let written =
            super::files::write_new_files(&path, table.as_ref(), &stored, &options, kept, &layout)
                .await?;
        Ok(StagedLoad {
            table,
            written,
            stored,
            options,
        })
    }
}

impl StagedLoad {
    /// Deletes the written files: nothing is published.
    pub async fn discard(self, path: &Location) {
        super::files::discard_new(path, self.table.as_ref(), &self.written.adds).await;
    }

    /// The table, created now when the load was written before it existed.
    pub(super) async fn table(&self, path: &Location) -> Result<deltalake::DeltaTable, DeltaError> {
        match &self.table {
            Some(table) => Ok(table.clone()),
            None => create_if_missing(path, &self.stored, &self.options).await,
        }
    }
}
