//! The floor of the ingest benchmark (`bench/`): read DMS CSV files with arrow-rs and write them as
//! Snappy Parquet, every column a string, one output file per input, files spread over the cores.
//! Nothing else: no typing, no lineage, no Delta log. How close `medallion` gets to this is the question.
//!
//! `cargo run --release --example csv_to_parquet -- <out-dir> <file.csv>...`

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::csv::ReaderBuilder;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: csv_to_parquet <out-dir> <file.csv>...");
        std::process::exit(2);
    };
    let files: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if let Err(error) = run(&out, &files) {
        eprintln!("csv_to_parquet: {error}");
        std::process::exit(1);
    }
}

fn run(out: &Path, files: &[PathBuf]) -> Result<(), Error> {
    std::fs::create_dir_all(out)?;
    let next = AtomicUsize::new(0);
    let rows = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), Error> {
                    while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        rows.fetch_add(convert(file, out)?, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|handle| handle.join().map_err(|_| "a worker panicked")?)
    })?;
    println!("{} rows", rows.load(Ordering::Relaxed));
    Ok(())
}

/// One CSV file (with a header row) to `<out>/<stem>.parquet`; gives the number of rows.
fn convert(file: &Path, out: &Path) -> Result<usize, Error> {
    let mut header = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(File::open(file)?), &mut header)?;
    let fields: Vec<Field> = header
        .trim_end()
        .split(',')
        .map(|name| Field::new(name, DataType::Utf8, true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let reader = ReaderBuilder::new(schema.clone())
        .with_header(true)
        .with_batch_size(64 * 1024)
        .build(File::open(file)?)?;
    let stem = file.file_stem().unwrap_or_default().to_string_lossy();
    let target = File::create(out.join(format!("{stem}.parquet")))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(target, schema, Some(properties))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch?;
        rows += batch.num_rows();
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(rows)
}
