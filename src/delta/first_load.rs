//! A cdc table's first load, written as the stage computes it. A first load compares with nothing (no
//! live rows, no tombstones): when it also changes each key once, every change that is not a delete is
//! an insert, so its rows can go to the table's files in the pass that computes them, and only a narrow
//! copy (keys, sequences, op, what the checks read) is kept for the cdc steps, which check it before the
//! files are published ([`super::PreparedChanges::commit`]) or removed
//! ([`super::PreparedChanges::discard`]). The same pass also counts what the cdc steps would otherwise
//! read the copy again for ([`LoadSummary`]): the keys held twice, the deletes, the key bounds and the
//! tracked values. When that summary can stand in for the copy (the keys dense enough for bitsets, no
//! partition columns), the copy needs only the rows the steps after the write look at one by one: those
//! an expectation flags and the deletes; the checks read the rows the load adds from its files
//! ([`StagedLoad::written_rows`]). The general path instead keeps the whole result in scratch files and
//! writes it after, reading it again.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use datafusion::{
    arrow::{
        array::{ArrayRef, AsArray, BooleanArray, RecordBatch},
        compute::{
            cast, filter, filter_record_batch,
            kernels::boolean::{and, not},
        },
        datatypes::{DataType, Field, Schema, SchemaRef},
    },
    error::DataFusionError,
    logical_expr::EmitTo,
    physical_plan::{
        SendableRecordBatchStream,
        aggregates::{
            group_values::{GroupValues, new_group_values},
            order::GroupOrdering,
        },
        stream::RecordBatchStreamAdapter,
    },
    prelude::{DataFrame, ParquetReadOptions, SessionContext, ident},
};
use futures::StreamExt;

use super::{
    DeltaError, TableOptions, create_if_missing,
    files::{FileStats, Layout, Written},
    quote,
};
use crate::{
    delta::cdc::{CdcSpec, Touched, clustered, collect_keys, holds_files},
    engine::udf::repeated::{KeyBits, is_integer_key},
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
    /// The key column.
    key: String,
    /// The least and greatest key the plan found, and how many keys.
    bounds: Option<(i64, i64)>,
    rows: usize,
    /// The tracked column, if any (at most one).
    track: Option<String>,
}

/// What a first load's copy in scratch holds, besides its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadCopy {
    /// Every row of the stage's output (some of its columns).
    Every,
    /// Only the rows an expectation flags and the deletes: the others are in the files alone, and
    /// the rows the load adds are read from there ([`StagedLoad::written_rows`]).
    Flagged,
}

/// A first load's files, written and not yet committed.
pub struct StagedLoad {
    pub(super) table: Option<deltalake::DeltaTable>,
    pub(super) written: Written,
    pub(super) stored: SchemaRef,
    pub(super) options: TableOptions,
    /// What the write saw of the rows the stage keeps.
    pub(super) summary: LoadSummary,
    /// What the copy in scratch holds.
    pub(super) copy: LoadCopy,
}

/// What a first load's write saw of the rows the stage keeps (those no expectation drops or
/// quarantines), its deletes included: what the cdc steps would otherwise read the load's copy again
/// for. It holds as long as the copy holds the same rows, which a count tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Rows of the stage's output, kept or not.
    pub seen: u64,
    /// Rows kept.
    pub rows: u64,
    /// Keys held by more than one kept row (NULL counted as one value, as `GROUP BY` counts it);
    /// `None` when not counted (keys too sparse for bitsets, or outside the bounds the plan found).
    pub repeated: Option<u64>,
    /// Kept rows that are deletes: in a first load, each a tombstone.
    pub deletes: u64,
    /// The least and greatest key, as SQL literals.
    pub bounds: Option<(String, String)>,
    /// The tracked column's values in the rows written, as text (no entry without a tracked column
    /// or without rows).
    pub touched: Touched,
}

/// One stream's share of a [`LoadSummary`], gathered as its batches pass.
struct Seen {
    /// Rows of the output.
    seen: u64,
    /// Kept rows.
    rows: u64,
    /// The keys of the kept rows, when they are dense enough for bitsets over the plan's bounds.
    keys: Option<KeyBits>,
    /// Kept rows that are deletes.
    deletes: u64,
    /// The distinct tracked values of the rows written, and the group ids of the last batch (reused).
    values: Option<(Box<dyn GroupValues>, Vec<usize>)>,
}

impl Seen {
    fn new(keys: Option<KeyBits>, track: Option<&Field>) -> datafusion::error::Result<Seen> {
        let values = match track {
            Some(field) => Some((
                new_group_values(
                    Arc::new(Schema::new(vec![field.clone().with_nullable(true)])),
                    &GroupOrdering::None,
                )?,
                Vec::new(),
            )),
            None => None,
        };
        Ok(Seen {
            seen: 0,
            rows: 0,
            keys,
            deletes: 0,
            values,
        })
    }

    /// Notes a batch: its keys and deletes where `kept`, and the tracked values of the rows `written`
    /// (in column `track` of them).
    fn observe(
        &mut self,
        keys: &ArrayRef,
        kept: &BooleanArray,
        delete: &BooleanArray,
        written: &RecordBatch,
        track: Option<usize>,
    ) -> datafusion::error::Result<()> {
        self.seen += keys.len() as u64;
        let keys = filter(keys, kept)?;
        self.rows += keys.len() as u64;
        if let Some(bits) = &mut self.keys {
            bits.append(&keys)?;
        }
        self.deletes += and(kept, delete)?.true_count() as u64;
        if let (Some((values, groups)), Some(index)) = (&mut self.values, track) {
            values.intern(&[written.column(index).clone()], groups)?;
        }
        Ok(())
    }
}

impl LoadSummary {
    /// The summary of the streams' shares, the tracked column named `track`.
    fn of(seen: Vec<Seen>, track: Option<&str>) -> datafusion::error::Result<LoadSummary> {
        let mut summary = LoadSummary::default();
        // The keys are counted only when every share counted them.
        let mut keys: Option<KeyBits> = None;
        let mut counted = true;
        let mut touched: BTreeSet<Option<String>> = BTreeSet::new();
        for part in seen {
            summary.seen += part.seen;
            summary.rows += part.rows;
            summary.deletes += part.deletes;
            match (&mut keys, part.keys) {
                (Some(all), Some(bits)) => all.merge(&bits),
                (None, Some(bits)) => keys = Some(bits),
                (_, None) => counted = false,
            }
            if let Some((mut values, _)) = part.values {
                for array in values.emit(EmitTo::All)? {
                    let text = cast(&array, &DataType::Utf8)?;
                    touched.extend(text.as_string::<i32>().iter().map(|v| v.map(String::from)));
                }
            }
        }
        if let Some(keys) = keys.filter(|_| counted) {
            summary.repeated = keys.repeated();
            summary.bounds = keys
                .bounds()
                .map(|(low, high)| (low.to_string(), high.to_string()));
        }
        // As the classification's summary: an entry once there are rows, even all deletes.
        if let Some(column) = track.filter(|_| summary.rows > 0) {
            summary.touched.insert(column.to_string(), touched);
        }
        Ok(summary)
    }
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
        let keys = output.clone().select(vec![ident(key)]).map_err(query)?;
        let keys = collect_keys(keys).await.map_err(query)?;
        let rows = keys.len() as u64;
        let key_bounds = keys.bounds();
        let bounds = key_bounds.map(|(low, high)| (low.to_string(), high.to_string()));
        // A NULL key is quarantined or fails the write: either way the general path reports it.
        if keys.nulls() > 0 || !keys.repeated().is_empty() {
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
            key: key.clone(),
            bounds: key_bounds,
            rows: rows as usize,
            track: spec.track.first().cloned(),
        }))
    }

    /// Whether the write's summary can stand in for a copy of every row ([`LoadCopy::Flagged`]): the
    /// keys are dense enough for bitsets, and the files hold every column as computed (no partition
    /// columns), so that they can be read back as the rows the load adds.
    pub fn summarizes(&self) -> bool {
        self.options.partition_by.is_empty()
            && self
                .bounds
                .is_some_and(|(low, high)| KeyBits::fits(low, high, self.rows))
    }

    /// Writes the rows of `streams` (batches of the stage's output plus boolean columns `kept` and
    /// `delete`) that are kept and not deletes, as the table's files, uncommitted, and sums up the kept
    /// rows ([`LoadSummary`]). The streams' other columns go elsewhere (see
    /// [`crate::engine::scratch::tee`]) as they are read: `copy` says what.
    pub async fn write(
        self,
        streams: Vec<SendableRecordBatchStream>,
        kept: &str,
        delete: &str,
        copy: LoadCopy,
    ) -> Result<StagedLoad, DeltaError> {
        let FirstLoad {
            path,
            table,
            layout,
            stored,
            options,
            key,
            bounds,
            rows: planned,
            track,
        } = self;
        let query = |e: DataFusionError| DeltaError::query(&path, e);
        let arrow = |e: datafusion::arrow::error::ArrowError| query(e.into());
        let track_index = match &track {
            Some(column) => Some(stored.index_of(column).map_err(arrow)?),
            None => None,
        };
        let mut seen = Vec::with_capacity(streams.len());
        let mut written = Vec::with_capacity(streams.len());
        for stream in streams {
            let schema = stream.schema();
            let kept_at = (schema.index_of(kept).map_err(arrow)?, quote(kept));
            let delete_at = (schema.index_of(delete).map_err(arrow)?, quote(delete));
            let key_at = schema.index_of(&key).map_err(arrow)?;
            let columns = stored
                .fields()
                .iter()
                .map(|f| schema.index_of(f.name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(arrow)?;
            let projected = Arc::new(schema.project(&columns).map_err(arrow)?);
            let bits = bounds.and_then(|(low, high)| KeyBits::new(low, high, planned));
            let part = Arc::new(Mutex::new(Some(
                Seen::new(bits, track_index.map(|i| projected.field(i))).map_err(query)?,
            )));
            seen.push(part.clone());
            let rows = stream.map(move |batch| {
                let batch = batch?;
                let boolean = |(index, name): &(usize, String)| {
                    batch
                        .column(*index)
                        .as_boolean_opt()
                        .cloned()
                        .ok_or_else(|| {
                            DataFusionError::Internal(format!("column {name} is not a boolean"))
                        })
                };
                let (kept, delete) = (boolean(&kept_at)?, boolean(&delete_at)?);
                let rows =
                    filter_record_batch(&batch.project(&columns)?, &and(&kept, &not(&delete)?)?)?;
                let mut seen = part.lock().map_err(|_| {
                    DataFusionError::Internal("a first load's summary was poisoned".into())
                })?;
                if let Some(seen) = seen.as_mut() {
                    seen.observe(batch.column(key_at), &kept, &delete, &rows, track_index)?;
                }
                Ok(rows)
            });
            written.push(Box::pin(RecordBatchStreamAdapter::new(projected, rows)) as _);
        }
        let written = super::files::write_new_files(
            &path,
            table.as_ref(),
            &stored,
            &options,
            written,
            &layout,
        )
        .await?;
        let parts: Option<Vec<Seen>> = seen
            .iter()
            .map(|part| part.lock().ok().and_then(|mut part| part.take()))
            .collect();
        let summary = parts
            .ok_or_else(|| DataFusionError::Internal("a first load's summary is incomplete".into()))
            .and_then(|parts| LoadSummary::of(parts, track.as_deref()));
        let summary = match summary {
            Ok(summary) => summary,
            Err(error) => {
                super::files::discard_new(&path, table.as_ref(), &written.adds).await;
                return Err(query(error));
            }
        };
        Ok(StagedLoad {
            table,
            written,
            stored,
            options,
            summary,
            copy,
        })
    }
}

impl StagedLoad {
    /// Deletes the written files: nothing is published.
    pub async fn discard(self, path: &Location) {
        super::files::discard_new(path, self.table.as_ref(), &self.written.adds).await;
    }

    /// What the write saw of the rows the stage keeps.
    pub fn summary(&self) -> &LoadSummary {
        &self.summary
    }

    /// The rows the load adds, read back from its files (written, not published), with the table's
    /// columns; `table` is the load's table ([`StagedLoad::table`]).
    pub(super) async fn written_rows(
        &self,
        ctx: &SessionContext,
        table: &deltalake::DeltaTable,
        path: &Location,
    ) -> Result<DataFrame, DeltaError> {
        let query = |e| DeltaError::query(path, e);
        let names: Vec<&str> = self
            .stored
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        if self.written.adds.is_empty() {
            let empty = RecordBatch::new_empty(self.stored.clone());
            return ctx.read_batch(empty).map_err(query);
        }
        // The files by their full address, in the store of the table's root (delta-rs's store for
        // the table itself gives listings whose paths do not match their prefix); a file's path is
        // relative to the table's root, and names no partition folder (see `FirstLoad::summarizes`).
        // Registered by scheme and host (`file://`, `s3://bucket`): the same store delta-rs reads this
        // table's files with, for the rest of the stage's session. Strings come back as views, as
        // every scan of the session reads them.
        let store = table.log_store();
        let location = store.config().location();
        ctx.register_object_store(location, store.root_object_store(None));
        let root = location.as_str().trim_end_matches('/');
        let files: Vec<String> = self
            .written
            .adds
            .iter()
            .map(|add| format!("{root}/{}", add.path))
            .collect();
        ctx.read_parquet(files, ParquetReadOptions::default())
            .await
            .and_then(|frame| frame.select_columns(&names))
            .map_err(query)
    }

    /// The table, created now when the load was written before it existed.
    pub(super) async fn table(&self, path: &Location) -> Result<deltalake::DeltaTable, DeltaError> {
        match &self.table {
            Some(table) => Ok(table.clone()),
            None => create_if_missing(path, &self.stored, &self.options).await,
        }
    }
}
