//! Landing files: discovery in AWS DMS order (full-load `LOAD*` files first, then change files by path,
//! date folders included), checksums for the ingest ledger, and streaming readers that turn CSV (plain or
//! gzip) and Parquet files into raw string batches with lineage. No Delta, no DataFusion here.

mod reader;

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

pub use reader::{
    BATCH_ID, BronzeLayout, FILE_ORDER, FileBatches, INGESTED_AT, Lineage, RUN_ID, SOURCE_FILE,
    SOURCE_ROW,
};

use crate::config::{FileFormat, Source};

#[derive(Debug, thiserror::Error)]
pub enum LandingError {
    #[error("source `{source_name}`: landing folder `{}` does not exist (check `path:` in the pipeline)", path.display())]
    MissingFolder { source_name: String, path: PathBuf },
    #[error("cannot read landing file `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("landing file `{file}` row {row}{}: {message}", column.as_ref().map(|c| format!(" column `{c}`")).unwrap_or_default())]
    Malformed {
        file: String,
        row: u64,
        column: Option<String>,
        message: String,
    },
    #[error("landing file `{file}`: {message}")]
    BadFile { file: String, message: String },
}

impl LandingError {
    /// Whether this error is about `file`.
    pub fn concerns(&self, file: &LandingFile) -> bool {
        match self {
            LandingError::Malformed { file: name, .. }
            | LandingError::BadFile { file: name, .. } => {
                *name == file.relative || Path::new(name) == file.path
            }
            LandingError::Io { path, .. } => *path == file.path,
            LandingError::MissingFolder { .. } => false,
        }
    }
}

/// Whether a file is part of DMS's full load or a change file; plain sources only have `Data` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    FullLoad,
    Change,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// One file found under a source's landing folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandingFile {
    pub path: PathBuf,
    /// Path relative to the source folder, `/`-separated: the file's name in the ledger and in lineage.
    pub relative: String,
    pub kind: FileKind,
    pub format: FileFormat,
    pub compression: Compression,
    pub size: u64,
}

impl LandingFile {
    /// Sort key that puts files in DMS commit order: full load first, then by file name (DMS names change
    /// files by commit time, so flat and `YYYY/MM/DD/` layouts interleave correctly), then by path.
    pub fn order_key(&self) -> String {
        let phase = match self.kind {
            FileKind::FullLoad => '0',
            FileKind::Change | FileKind::Data => '1',
        };
        let name = self.relative.rsplit('/').next().unwrap_or(&self.relative);
        format!("{phase}/{name}/{}", self.relative)
    }

    /// The date a DMS file belongs to: its `YYYY/MM/DD/` folders, else a change-file name starting with
    /// `YYYYMMDD`. `None` for full-load files and anything undated.
    pub fn date(&self) -> Option<chrono::NaiveDate> {
        if self.kind == FileKind::FullLoad {
            return None;
        }
        let parts: Vec<&str> = self.relative.split('/').collect();
        for window in parts.windows(3) {
            if let [y, m, d] = window
                && y.len() == 4
                && m.len() == 2
                && d.len() == 2
                && let Ok(date) =
                    chrono::NaiveDate::parse_from_str(&format!("{y}-{m}-{d}"), "%Y-%m-%d")
            {
                return Some(date);
            }
        }
        let name = parts.last()?;
        chrono::NaiveDate::parse_from_str(name.get(..8)?, "%Y%m%d").ok()
    }

    /// SHA-256 of the file's bytes, streamed.
    pub fn checksum(&self) -> Result<String, LandingError> {
        let io = |source| LandingError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Lists the source's landing files in DMS order. Hidden files and files of other formats are ignored.
pub fn discover(source: &Source) -> Result<Vec<LandingFile>, LandingError> {
    if !source.path.is_dir() {
        return Err(LandingError::MissingFolder {
            source_name: source.name.clone(),
            path: source.path.clone(),
        });
    }
    let mut files = Vec::new();
    walk(source, &source.path, &mut files)?;
    files.sort_by_key(LandingFile::order_key);
    Ok(files)
}

fn walk(source: &Source, dir: &Path, files: &mut Vec<LandingFile>) -> Result<(), LandingError> {
    let io = |source| LandingError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let file_type = entry.file_type().map_err(io)?;
        if file_type.is_dir() {
            walk(source, &path, files)?;
            continue;
        }
        let (stem, compression) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, Compression::Gzip),
            None => (name.as_str(), Compression::None),
        };
        let extension = match source.format {
            FileFormat::Csv => ".csv",
            FileFormat::Parquet => ".parquet",
            FileFormat::Json => ".json",
        };
        let Some(base) = stem.strip_suffix(extension) else {
            continue;
        };
        let kind = match &source.dms {
            Some(_) if base.starts_with("LOAD") => FileKind::FullLoad,
            Some(_) => FileKind::Change,
            None => FileKind::Data,
        };
        let relative = path
            .strip_prefix(&source.path)
            .unwrap_or(&path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let size = entry.metadata().map_err(io)?.len();
        files.push(LandingFile {
            path,
            relative,
            kind,
            format: source.format,
            compression,
            size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DmsLayout;

    fn source(dir: &Path) -> Source {
        Source {
            name: "t".into(),
            path: dir.to_path_buf(),
            format: FileFormat::Csv,
            header: true,
            delimiter: b',',
            columns: vec!["id".into()],
            key: vec![],
            dms: Some(DmsLayout {
                timestamp_column: None,
                include_op_for_full_load: false,
                change_seq: false,
            }),
            on_bad_file: crate::config::BadFilePolicy::Fail,
        }
    }

    #[test]
    fn dms_order_is_full_load_then_changes_by_path() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "2019/11/02/20191102-0000000000.csv",
            "20191101-1134010000.csv.gz",
            "LOAD0000000A.csv",
            "LOAD00000009.csv",
            "notes.txt",
            ".hidden.csv",
        ] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "id\n1\n").unwrap();
        }
        let files = discover(&source(dir.path())).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.relative.as_str()).collect();
        assert_eq!(
            names,
            [
                "LOAD00000009.csv",
                "LOAD0000000A.csv",
                "20191101-1134010000.csv.gz",
                "2019/11/02/20191102-0000000000.csv"
            ]
        );
        assert_eq!(files[0].kind, FileKind::FullLoad);
        assert_eq!(files[2].compression, Compression::Gzip);
    }
}
