//! Streaming readers: one landing file → raw string record batches in the Bronze layout, plus lineage
//! columns. Rows are checked as they stream: a wrong field count or invalid UTF-8 names the file and row.

use std::{
    fs::File,
    io::{BufReader, Read},
    sync::Arc,
};

use arrow::{
    array::{
        ArrayRef, Int64Array, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
    },
    buffer::{Buffer, OffsetBuffer},
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
};
use flate2::read::MultiGzDecoder;
use parquet::{
    arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder},
    file::reader::ChunkReader,
};

use super::{Compression, FileKind, LandingError, LandingFile};
use crate::{
    config::{DmsLayout, FileFormat, Source},
    storage::{ReadFailure, RemoteFile},
};

/// Lineage columns appended to every Bronze row.
pub const SOURCE_FILE: &str = "_source_file";
pub const FILE_ORDER: &str = "_file_order";
pub const SOURCE_ROW: &str = "_source_row";
pub const INGESTED_AT: &str = "_ingested_at";
pub const RUN_ID: &str = "_run_id";
pub const BATCH_ID: &str = "_batch_id";

/// The column layout of a source's Bronze table and how each landing file maps onto it.
#[derive(Debug, Clone)]
pub struct BronzeLayout {
    columns: Vec<String>,
    header: bool,
    delimiter: u8,
    dms: Option<DmsLayout>,
    own_columns: Vec<String>,
    schema: SchemaRef,
}

impl BronzeLayout {
    /// The lineage columns every Bronze table ends with, in order.
    pub const LINEAGE: [&str; 6] = [
        SOURCE_FILE,
        FILE_ORDER,
        SOURCE_ROW,
        INGESTED_AT,
        RUN_ID,
        BATCH_ID,
    ];

    pub fn new(source: &Source) -> BronzeLayout {
        let columns = source.bronze_columns();
        let mut fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(c, DataType::Utf8, true))
            .collect();
        fields.extend([
            Field::new(SOURCE_FILE, DataType::Utf8, false),
            Field::new(FILE_ORDER, DataType::Utf8, false),
            Field::new(SOURCE_ROW, DataType::Int64, false),
            Field::new(
                INGESTED_AT,
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new(RUN_ID, DataType::Utf8, false),
            Field::new(BATCH_ID, DataType::Int64, false),
        ]);
        BronzeLayout {
            columns,
            header: source.header,
            delimiter: source.delimiter,
            dms: source.dms.clone(),
            own_columns: source.columns.clone(),
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// Arrow schema of the Bronze table: raw string columns, then lineage.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Columns of a headerless file of `kind`, in file order.
    fn positional_columns(&self, kind: FileKind) -> Vec<String> {
        let Some(dms) = &self.dms else {
            return self.own_columns.clone();
        };
        let mut columns = Vec::new();
        if kind == FileKind::Change || dms.include_op_for_full_load {
            columns.push(DmsLayout::OP_COLUMN.to_string());
        }
        columns.extend(dms.timestamp_column.iter().cloned());
        columns.extend(self.own_columns.iter().cloned());
        if dms.change_seq {
            columns.push(DmsLayout::CHANGE_SEQ_COLUMN.to_string());
        }
        columns
    }

    /// Maps file column names (from a header or a Parquet schema) to Bronze column positions. Only the
    /// DMS columns may be missing; an unknown column is schema drift and an error.
    fn map_named(&self, file: &str, names: &[String]) -> Result<Vec<usize>, LandingError> {
        let mut mapping = Vec::with_capacity(names.len());
        for name in names {
            let name = name.trim_start_matches('\u{feff}');
            let bronze = match name {
                DmsLayout::CHANGE_SEQ_HEADER => DmsLayout::CHANGE_SEQ_COLUMN,
                DmsLayout::OP_HEADER if self.dms.is_some() => DmsLayout::OP_COLUMN,
                _ => name,
            };
            match self.columns.iter().position(|c| c == bronze) {
                Some(index) if !mapping.contains(&index) => mapping.push(index),
                Some(_) => {
                    return Err(LandingError::BadFile {
                        file: file.to_string(),
                        message: format!("column `{name}` appears twice in the header"),
                    });
                }
                None => {
                    return Err(LandingError::BadFile {
                        file: file.to_string(),
                        message: format!(
                            "column `{name}` is not one of the source's columns ({}); add it to `columns:` in the pipeline if the table gained a column",
                            self.columns.join(", ")
                        ),
                    });
                }
            }
        }
        for column in &self.own_columns {
            let index = self.columns.iter().position(|c| c == column);
            if index.is_some_and(|i| !mapping.contains(&i)) {
                return Err(LandingError::BadFile {
                    file: file.to_string(),
                    message: format!("column `{column}` is missing from the file"),
                });
            }
        }
        Ok(mapping)
    }
}

/// Lineage values that are the same for every row of one ingest.
#[derive(Debug, Clone)]
pub struct Lineage {
    pub run_id: String,
    pub batch_id: i64,
    pub ingested_at_micros: i64,
}

/// Iterator over the record batches of one landing file.
pub struct FileBatches {
    layout: BronzeLayout,
    file: LandingFile,
    lineage: Lineage,
    batch_size: usize,
    rows: u64,
    inner: Inner,
    /// Storage failures while reading an object (none for local files and bytes).
    failure: Option<ReadFailure>,
    /// The lineage columns of one value, for as many rows as the longest batch yet; each batch takes a
    /// slice (their copies of the file's name, order key and run id took 8 MB a batch, built anew).
    constants: Option<Constants>,
    /// Bytes each string column held in the last batch: the next one's builders start that large
    /// rather than growing to it.
    value_bytes: Vec<usize>,
}

/// See [`FileBatches::constants`].
struct Constants {
    rows: usize,
    source_file: ArrayRef,
    order_key: ArrayRef,
    ingested_at: ArrayRef,
    run_id: ArrayRef,
    batch_id: ArrayRef,
}

enum Inner {
    Csv {
        reader: csv::Reader<Box<dyn Read + Send>>,
        mapping: Vec<usize>,
    },
    Parquet {
        reader: ParquetRecordBatchReader,
        mapping: Vec<usize>,
    },
    /// Rows of a JSON lookup file, already parsed (such files are small and read whole).
    Rows(std::vec::IntoIter<Vec<Option<String>>>),
}

/// JSON sources are lookup files read whole; anything larger belongs in CSV or Parquet.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// Where a landing file's bytes come from.
pub enum Input {
    File(File),
    Remote(RemoteFile),
    /// Bytes in memory (fuzzing, tests).
    Bytes(bytes::Bytes),
}

impl Input {
    /// The local file, or the object on object storage (read lazily).
    fn of(file: &LandingFile) -> Result<Input, LandingError> {
        let io = |source| LandingError::Io {
            path: file.path.clone(),
            source,
        };
        match file.path.local_path() {
            Some(path) => Ok(Input::File(File::open(path).map_err(io)?)),
            None => RemoteFile::open(&file.path, file.size)
                .map(Input::Remote)
                .map_err(|e| unreachable(file, e.to_string())),
        }
    }

    /// All the bytes as a blocking reader: one streaming GET on object storage.
    fn into_read(self, file: &LandingFile) -> Result<Box<dyn Read + Send>, LandingError> {
        Ok(match self {
            Input::File(handle) => Box::new(handle),
            Input::Remote(remote) => Box::new(
                remote
                    .reader_from(0)
                    .map_err(|e| unreachable(file, e.to_string()))?,
            ),
            Input::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

impl FileBatches {
    pub fn open(
        layout: &BronzeLayout,
        file: &LandingFile,
        lineage: Lineage,
        batch_size: usize,
    ) -> Result<FileBatches, LandingError> {
        FileBatches::from_input(layout, file, lineage, batch_size, Input::of(file)?)
    }

    /// Reads `file`'s content from `input` (its name, kind, format and compression come from `file`).
    pub fn from_input(
        layout: &BronzeLayout,
        file: &LandingFile,
        lineage: Lineage,
        batch_size: usize,
        input: Input,
    ) -> Result<FileBatches, LandingError> {
        let failure = match &input {
            Input::Remote(remote) => Some(remote.failure()),
            _ => None,
        };
        let inner = Self::inner(layout, file, batch_size, input)
            .map_err(|e| blame_storage(e, failure.as_ref(), file))?;
        Ok(FileBatches {
            layout: layout.clone(),
            file: file.clone(),
            lineage,
            batch_size,
            rows: 0,
            inner,
            failure,
            constants: None,
            value_bytes: vec![batch_size * 8; layout.columns.len()],
        })
    }

    fn inner(
        layout: &BronzeLayout,
        file: &LandingFile,
        batch_size: usize,
        input: Input,
    ) -> Result<Inner, LandingError> {
        Ok(match file.format {
            FileFormat::Csv => {
                let handle = input.into_read(file)?;
                let raw: Box<dyn Read + Send> = match file.compression {
                    Compression::None => Box::new(BufReader::with_capacity(1 << 20, handle)),
                    Compression::Gzip => Box::new(MultiGzDecoder::new(BufReader::new(handle))),
                };
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(layout.header)
                    .delimiter(layout.delimiter)
                    .flexible(true)
                    .from_reader(raw);
                let mapping = if layout.header {
                    let header = reader
                        .headers()
                        .map_err(|e| csv_error(&file.relative, e, None))?;
                    let names: Vec<String> = header.iter().map(str::to_string).collect();
                    if names.len() <= 1 && names.iter().all(|n| n.is_empty()) {
                        return Err(LandingError::BadFile {
                            file: file.relative.clone(),
                            message: "file is empty: expected a header row (the source has `header: true`)".into(),
                        });
                    }
                    layout.map_named(&file.relative, &names)?
                } else {
                    let names = layout.positional_columns(file.kind);
                    names
                        .iter()
                        .filter_map(|n| layout.columns.iter().position(|c| c == n))
                        .collect()
                };
                Inner::Csv { reader, mapping }
            }
            FileFormat::Parquet => {
                // On object storage, Parquet is read with ranged GETs: the footer, then the column chunks.
                let (reader, mapping) = match input {
                    Input::File(handle) => parquet_reader(layout, file, handle, batch_size)?,
                    Input::Remote(remote) => parquet_reader(layout, file, remote, batch_size)?,
                    Input::Bytes(bytes) => parquet_reader(layout, file, bytes, batch_size)?,
                };
                Inner::Parquet { reader, mapping }
            }
            FileFormat::Json => {
                if file.size > MAX_JSON_BYTES {
                    return Err(LandingError::BadFile {
                        file: file.relative.clone(),
                        message: format!(
                            "JSON sources are lookup files read whole (at most {} MB); land larger tables as CSV or Parquet",
                            MAX_JSON_BYTES >> 20
                        ),
                    });
                }
                let handle = input.into_read(file)?;
                let raw: Box<dyn Read> = match file.compression {
                    Compression::None => Box::new(BufReader::new(handle)),
                    Compression::Gzip => Box::new(MultiGzDecoder::new(BufReader::new(handle))),
                };
                Inner::Rows(json_rows(layout, &file.relative, raw)?.into_iter())
            }
        })
    }

    fn next_csv(&mut self) -> Result<Option<RecordBatch>, LandingError> {
        let Inner::Csv { reader, mapping } = &mut self.inner else {
            return Ok(None);
        };
        let width = self.layout.columns.len();
        let mut builders: Vec<StringBuilder> = self
            .value_bytes
            .iter()
            .map(|&bytes| StringBuilder::with_capacity(self.batch_size, bytes + bytes / 16))
            .collect();
        let mut record = csv::StringRecord::new();
        let mut count = 0;
        let expected = mapping.len();
        // Columns of the layout the file does not have: NULL on every row.
        let absent: Vec<usize> = (0..width).filter(|c| !mapping.contains(c)).collect();
        while count < self.batch_size {
            let row = self.rows + 1;
            let more = reader
                .read_record(&mut record)
                .map_err(|e| csv_error(&self.file.relative, e, Some(row)))?;
            if !more {
                break;
            }
            if record.len() != expected {
                // Name the first column the row cannot fill, or the first field it has too many.
                let column = match mapping.get(record.len()) {
                    Some(&missing) => self.layout.columns[missing].clone(),
                    None => format!("#{} (after the last column)", expected + 1),
                };
                return Err(LandingError::Malformed {
                    file: self.file.relative.clone(),
                    row,
                    column: Some(column),
                    message: format!(
                        "expected {expected} fields, found {} (line {})",
                        record.len(),
                        record.position().map(|p| p.line()).unwrap_or(0)
                    ),
                });
            }
            self.rows = row;
            for (value, &target) in record.iter().zip(mapping.iter()) {
                builders[target].append_value(value);
            }
            for &column in &absent {
                builders[column].append_null();
            }
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        self.value_bytes = builders.iter().map(|b| b.values_slice().len()).collect();
        let columns: Vec<ArrayRef> = builders
            .into_iter()
            .map(|mut b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        self.with_lineage(columns, count).map(Some)
    }

    fn next_parquet(&mut self) -> Result<Option<RecordBatch>, LandingError> {
        let Inner::Parquet { reader, mapping } = &mut self.inner else {
            return Ok(None);
        };
        let Some(batch) = reader.next() else {
            return Ok(None);
        };
        let file = self.file.relative.clone();
        let batch = batch.map_err(|e| LandingError::BadFile {
            file: file.clone(),
            message: format!("corrupt Parquet data after row {}: {e}", self.rows),
        })?;
        let count = batch.num_rows();
        let mut columns: Vec<Option<ArrayRef>> = vec![None; self.layout.columns.len()];
        for (index, &target) in mapping.iter().enumerate() {
            let array =
                arrow::compute::cast(batch.column(index), &DataType::Utf8).map_err(|e| {
                    LandingError::BadFile {
                        file: file.clone(),
                        message: format!(
                            "column `{}` cannot be read as text: {e}",
                            self.layout.columns[target]
                        ),
                    }
                })?;
            columns[target] = Some(array);
        }
        let columns = columns
            .into_iter()
            .map(|c| c.unwrap_or_else(|| arrow::array::new_null_array(&DataType::Utf8, count)))
            .collect();
        self.rows += count as u64;
        self.with_lineage(columns, count).map(Some)
    }

    fn next_rows(&mut self) -> Result<Option<RecordBatch>, LandingError> {
        let Inner::Rows(rows) = &mut self.inner else {
            return Ok(None);
        };
        let width = self.layout.columns.len();
        let mut builders: Vec<StringBuilder> = (0..width).map(|_| StringBuilder::new()).collect();
        let mut count = 0;
        for row in rows.by_ref().take(self.batch_size) {
            for (builder, value) in builders.iter_mut().zip(row) {
                builder.append_option(value);
            }
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        self.rows += count as u64;
        let columns = builders
            .into_iter()
            .map(|mut b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        self.with_lineage(columns, count).map(Some)
    }

    fn with_lineage(
        &mut self,
        mut columns: Vec<ArrayRef>,
        count: usize,
    ) -> Result<RecordBatch, LandingError> {
        let first_row = self.rows as i64 - count as i64 + 1;
        let constants = match self.constants.take() {
            Some(constants) if constants.rows >= count => constants,
            _ => self.lineage_constants(count)?,
        };
        columns.push(constants.source_file.slice(0, count));
        columns.push(constants.order_key.slice(0, count));
        columns.push(Arc::new(Int64Array::from_iter_values(
            first_row..first_row + count as i64,
        )));
        columns.push(constants.ingested_at.slice(0, count));
        columns.push(constants.run_id.slice(0, count));
        columns.push(constants.batch_id.slice(0, count));
        self.constants = Some(constants);
        RecordBatch::try_new(self.layout.schema(), columns).map_err(|e| LandingError::BadFile {
            file: self.file.relative.clone(),
            message: format!("internal error building a batch: {e}"),
        })
    }

    /// The lineage columns of one value for `rows` rows.
    fn lineage_constants(&self, rows: usize) -> Result<Constants, LandingError> {
        let constant = |value: &str| {
            constant_strings(value, rows).ok_or_else(|| LandingError::BadFile {
                file: self.file.relative.clone(),
                message: format!("{rows} copies of the lineage value `{value}` exceed one batch"),
            })
        };
        Ok(Constants {
            rows,
            source_file: constant(&self.file.relative)?,
            order_key: constant(&self.file.order_key())?,
            ingested_at: Arc::new(
                TimestampMicrosecondArray::from_value(self.lineage.ingested_at_micros, rows)
                    .with_timezone("UTC"),
            ),
            run_id: constant(&self.lineage.run_id)?,
            batch_id: Arc::new(Int64Array::from_value(self.lineage.batch_id, rows)),
        })
    }

    /// Data rows read so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

impl Iterator for FileBatches {
    type Item = Result<RecordBatch, LandingError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = match self.inner {
            Inner::Csv { .. } => self.next_csv(),
            Inner::Parquet { .. } => self.next_parquet(),
            Inner::Rows(_) => self.next_rows(),
        };
        next.map_err(|e| blame_storage(e, self.failure.as_ref(), &self.file))
            .transpose()
    }
}

/// `count` copies of `value` as a string column, its offsets and bytes laid out directly (the lineage
/// columns repeat one value over every row of a batch). `None` when the copies overflow a string
/// column's 2 GiB of bytes.
fn constant_strings(value: &str, count: usize) -> Option<ArrayRef> {
    let length = value.len();
    i32::try_from(length.checked_mul(count)?).ok()?;
    let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(length, count));
    let bytes = Buffer::from_vec(value.as_bytes().repeat(count));
    Some(Arc::new(StringArray::new(offsets, bytes, None)))
}

/// Parses a JSON lookup file: an object of `key: value` pairs fills the source's two columns; an array of
/// objects fills columns by name. Values that are not strings keep their JSON text.
fn json_rows(
    layout: &BronzeLayout,
    file: &str,
    reader: Box<dyn Read>,
) -> Result<Vec<Vec<Option<String>>>, LandingError> {
    let bad = |message: String| LandingError::BadFile {
        file: file.to_string(),
        message,
    };
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let value: serde_json::Value =
        serde_json::from_reader(reader).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let columns = &layout.columns;
    match value {
        serde_json::Value::Object(map) => {
            if columns.len() != 2 {
                return Err(bad(format!(
                    "a JSON object of `key: value` pairs fills exactly two columns, but the source lists {}",
                    columns.len()
                )));
            }
            Ok(map
                .into_iter()
                .map(|(key, value)| vec![Some(key), text(&value)])
                .collect())
        }
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let serde_json::Value::Object(object) = item else {
                    return Err(LandingError::Malformed {
                        file: file.to_string(),
                        row: index as u64 + 1,
                        column: None,
                        message: "expected a JSON object".into(),
                    });
                };
                if let Some(unknown) = object.keys().find(|k| !columns.contains(k)) {
                    return Err(LandingError::Malformed {
                        file: file.to_string(),
                        row: index as u64 + 1,
                        column: Some(unknown.clone()),
                        message: "not one of the source's columns".into(),
                    });
                }
                Ok(columns
                    .iter()
                    .map(|c| object.get(c).and_then(text))
                    .collect())
            })
            .collect(),
        _ => Err(bad(
            "expected a JSON object of `key: value` pairs or an array of objects".into(),
        )),
    }
}

fn csv_error(file: &str, error: csv::Error, row: Option<u64>) -> LandingError {
    let position = error.position().map(|p| p.line());
    let (column, message) = match error.kind() {
        csv::ErrorKind::Utf8 { err, .. } => (
            Some(format!("#{}", err.field() + 1)),
            format!("invalid UTF-8 (the file must be UTF-8 encoded): {err}"),
        ),
        csv::ErrorKind::Io(e) => (
            None,
            format!("read failed (truncated or corrupt file?): {e}"),
        ),
        _ => (None, error.to_string()),
    };
    match row {
        Some(row) => LandingError::Malformed {
            file: file.to_string(),
            row,
            column,
            message: match position {
                Some(line) => format!("{message} (line {line})"),
                None => message,
            },
        },
        None => LandingError::BadFile {
            file: file.to_string(),
            message: format!("cannot read the header: {message}"),
        },
    }
}
/// The file could not be read from storage (not a fault of its content).
fn unreachable(file: &LandingFile, message: String) -> LandingError {
    LandingError::Unreachable {
        file: file.path.to_string(),
        message,
    }
}

/// `error`, unless reading the object failed in storage underneath it: then that, so that a throttled
/// or dropped connection never gets a good file set aside as bad.
fn blame_storage(
    error: LandingError,
    failure: Option<&ReadFailure>,
    file: &LandingFile,
) -> LandingError {
    match failure.and_then(ReadFailure::get) {
        Some(message) => unreachable(file, message),
        None => error,
    }
}

/// A Parquet reader over `input` and the mapping of its columns onto the Bronze layout.
fn parquet_reader<T: ChunkReader + 'static>(
    layout: &BronzeLayout,
    file: &LandingFile,
    input: T,
    batch_size: usize,
) -> Result<(ParquetRecordBatchReader, Vec<usize>), LandingError> {
    let unreadable = |e: parquet::errors::ParquetError| LandingError::BadFile {
        file: file.relative.clone(),
        message: format!("not a readable Parquet file: {e}"),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(input).map_err(unreadable)?;
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mapping = layout.map_named(&file.relative, &names)?;
    let reader = builder
        .with_batch_size(batch_size)
        .build()
        .map_err(unreadable)?;
    Ok((reader, mapping))
}

#[cfg(test)]
mod tests {
    use arrow::array::Array;

    use super::*;

    #[test]
    fn a_constant_column_equals_the_value_repeated_and_refuses_more_bytes_than_offsets_hold() {
        let column = constant_strings("public/transactions/LOAD00000001.csv", 1000);
        let expected = StringArray::from(vec!["public/transactions/LOAD00000001.csv"; 1000]);
        assert_eq!(
            column.as_deref().map(|c| c.to_data()),
            Some(expected.to_data())
        );
        assert_eq!(
            constant_strings("", 5).map(|c| c.len()),
            Some(5),
            "an empty value still fills every row"
        );
        assert!(constant_strings("abc", 1 << 30).is_none());
    }

    /// Batches of a file, the last one shorter and a column's values longer in a later batch than in
    /// the first: every batch's lineage holds its own row numbers and the one value of each constant,
    /// for exactly its rows.
    #[test]
    fn every_batch_holds_its_own_rows_and_lineage() {
        use crate::config::{BadFilePolicy, DmsLayout};
        use arrow::array::AsArray;
        let source = Source {
            name: "t".into(),
            path: crate::storage::Location::local("/nonexistent"),
            format: FileFormat::Csv,
            header: false,
            delimiter: b',',
            columns: vec!["id".into(), "val".into()],
            key: vec!["id".into()],
            dms: Some(DmsLayout {
                timestamp_column: None,
                include_op_for_full_load: false,
                change_seq: false,
            }),
            on_bad_file: BadFilePolicy::Fail,
        };
        let content = "1,a\n2,b\n3,a much longer value than the first batch held\n4,d\n5,e\n";
        let file = LandingFile {
            path: crate::storage::Location::local("/nonexistent/LOAD00000001.csv"),
            relative: "LOAD00000001.csv".into(),
            kind: FileKind::FullLoad,
            format: FileFormat::Csv,
            compression: Compression::None,
            size: content.len() as u64,
            modified_micros: 0,
        };
        let lineage = Lineage {
            run_id: "run-1".into(),
            batch_id: 7,
            ingested_at_micros: 42,
        };
        let layout = BronzeLayout::new(&source);
        let input = Input::Bytes(bytes::Bytes::from(content));
        let batches: Vec<RecordBatch> = FileBatches::from_input(&layout, &file, lineage, 2, input)
            .expect("open")
            .collect::<Result<_, _>>()
            .expect("read");
        assert_eq!(
            batches
                .iter()
                .map(RecordBatch::num_rows)
                .collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let column =
            |batch: &RecordBatch, name: &str| batch.column_by_name(name).cloned().expect(name);
        let strings = |batch: &RecordBatch, name: &str| -> Vec<Option<String>> {
            let column = column(batch, name);
            column
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect()
        };
        let integers = |batch: &RecordBatch, name: &str| -> Vec<i64> {
            let column = column(batch, name);
            column
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        };
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        for batch in &batches {
            let n = batch.num_rows();
            let one = |value: String| vec![Some(value); n];
            assert_eq!(strings(batch, SOURCE_FILE), one("LOAD00000001.csv".into()));
            assert_eq!(strings(batch, FILE_ORDER), one(file.order_key()));
            assert_eq!(strings(batch, RUN_ID), one("run-1".into()));
            assert_eq!(integers(batch, BATCH_ID), vec![7; n]);
            let ingested = column(batch, INGESTED_AT);
            let ingested = ingested.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            assert_eq!(ingested.values().to_vec(), vec![42; n]);
            rows.extend(integers(batch, SOURCE_ROW));
            values.extend(strings(batch, "val").into_iter().flatten());
        }
        assert_eq!(rows, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            values,
            [
                "a",
                "b",
                "a much longer value than the first batch held",
                "d",
                "e"
            ]
        );
    }
}
