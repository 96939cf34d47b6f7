//! File sinks for the generator: CSV (optionally gzip) or Parquet, with or without a header, one row of
//! strings at a time. Empty strings are written as empty CSV fields and as nulls in Parquet.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow::{
    array::{ArrayBuilder, ArrayRef, RecordBatch, StringBuilder},
    datatypes::{DataType, Field, Schema, SchemaRef},
};
use flate2::{Compression, write::GzEncoder};
use parquet::arrow::ArrowWriter;

use super::GenerateError;

/// How generated files are written (the DMS S3 target settings they imitate).
#[derive(Debug, Clone, Copy)]
pub struct FileStyle {
    pub header: bool,
    pub parquet: bool,
    pub gzip: bool,
}

impl FileStyle {
    pub fn extension(&self) -> &'static str {
        match (self.parquet, self.gzip) {
            (true, _) => "parquet",
            (false, true) => "csv.gz",
            (false, false) => "csv",
        }
    }
}

pub enum RowSink {
    Csv {
        path: PathBuf,
        writer: csv::Writer<Box<dyn Write>>,
    },
    Parquet {
        path: PathBuf,
        schema: SchemaRef,
        builders: Vec<StringBuilder>,
        writer: ArrowWriter<File>,
    },
}

const PARQUET_BATCH: usize = 8192;

impl RowSink {
    pub fn create(
        path: &Path,
        style: FileStyle,
        columns: &[&str],
    ) -> Result<RowSink, GenerateError> {
        let io = |source| GenerateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = File::create(path).map_err(io)?;
        if style.parquet {
            let schema = Arc::new(Schema::new(
                columns
                    .iter()
                    .map(|c| Field::new(*c, DataType::Utf8, true))
                    .collect::<Vec<_>>(),
            ));
            let writer = ArrowWriter::try_new(file, schema.clone(), None)
                .map_err(|e| GenerateError::Write(path.to_path_buf(), e.to_string()))?;
            return Ok(RowSink::Parquet {
                path: path.to_path_buf(),
                builders: columns.iter().map(|_| StringBuilder::new()).collect(),
                schema,
                writer,
            });
        }
        let out: Box<dyn Write> = if style.gzip {
            Box::new(GzEncoder::new(BufWriter::new(file), Compression::fast()))
        } else {
            Box::new(BufWriter::new(file))
        };
        let mut writer = csv::WriterBuilder::new().from_writer(out);
        if style.header {
            writer
                .write_record(columns)
                .map_err(|e| GenerateError::Write(path.to_path_buf(), e.to_string()))?;
        }
        Ok(RowSink::Csv {
            path: path.to_path_buf(),
            writer,
        })
    }

    pub fn write(&mut self, row: &[&str]) -> Result<(), GenerateError> {
        match self {
            RowSink::Csv { path, writer } => writer
                .write_record(row)
                .map_err(|e| GenerateError::Write(path.clone(), e.to_string())),
            RowSink::Parquet { builders, .. } => {
                for (builder, value) in builders.iter_mut().zip(row) {
                    if value.is_empty() {
                        builder.append_null();
                    } else {
                        builder.append_value(value);
                    }
                }
                if builders[0].len() >= PARQUET_BATCH {
                    self.flush_batch()?;
                }
                Ok(())
            }
        }
    }

    fn flush_batch(&mut self) -> Result<(), GenerateError> {
        let RowSink::Parquet {
            path,
            schema,
            builders,
            writer,
        } = self
        else {
            return Ok(());
        };
        if builders.first().is_none_or(|b| b.is_empty()) {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = builders
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| GenerateError::Write(path.clone(), e.to_string()))?;
        writer
            .write(&batch)
            .map_err(|e| GenerateError::Write(path.clone(), e.to_string()))
    }

    pub fn finish(mut self) -> Result<(), GenerateError> {
        self.flush_batch()?;
        match self {
            RowSink::Csv { path, writer } => {
                let mut inner = writer
                    .into_inner()
                    .map_err(|e| GenerateError::Write(path.clone(), e.to_string()))?;
                inner
                    .flush()
                    .map_err(|e| GenerateError::Write(path.clone(), e.to_string()))?;
                // Dropping a GzEncoder writes its trailer; flush above pushed the buffered data.
                drop(inner);
                Ok(())
            }
            RowSink::Parquet { path, writer, .. } => writer
                .close()
                .map(|_| ())
                .map_err(|e| GenerateError::Write(path, e.to_string())),
        }
    }
}
