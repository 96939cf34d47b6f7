//! Landing files: discovery in AWS DMS order (full-load `LOAD*` files first, then change files by path,
//! date folders included), checksums for the ingest ledger, and streaming readers that turn CSV (plain or
//! gzip) and Parquet files into raw string batches with lineage. No Delta, no DataFusion here.

mod reader;

use std::{io::Read, path::Path};

use futures::StreamExt;
use sha2::{Digest, Sha256};

pub use reader::{
    BATCH_ID, BronzeLayout, FILE_ORDER, FileBatches, INGESTED_AT, Input, Lineage, RUN_ID,
    SOURCE_FILE, SOURCE_ROW,
};

use crate::{
    config::{FileFormat, Source},
    storage::{self, Location, StorageError},
};

#[derive(Debug, thiserror::Error)]
pub enum LandingError {
    #[error(
        "source `{source_name}`: landing folder `{path}` does not exist or holds no file (check `path:` in the pipeline)"
    )]
    MissingFolder { source_name: String, path: Location },
    #[error("cannot read landing file `{path}`: {source}")]
    Io {
        path: Location,
        source: std::io::Error,
    },
    #[error("source `{source_name}`: landing folder {source}")]
    Storage {
        source_name: String,
        source: StorageError,
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
    #[error(
        "landing file `{file}` could not be read from storage ({message}); it is not set aside: the next run reads it again"
    )]
    Unreachable { file: String, message: String },
}

impl LandingError {
    /// Whether this error is about `file`.
    pub fn concerns(&self, file: &LandingFile) -> bool {
        match self {
            LandingError::Malformed { file: name, .. }
            | LandingError::BadFile { file: name, .. } => {
                *name == file.relative || *name == file.path.to_string()
            }
            LandingError::Io { path, .. } => *path == file.path,
            LandingError::MissingFolder { .. }
            | LandingError::Storage { .. }
            | LandingError::Unreachable { .. } => false,
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
    pub path: Location,
    /// Path relative to the source folder, `/`-separated: the file's name in the ledger and in lineage.
    pub relative: String,
    pub kind: FileKind,
    pub format: FileFormat,
    pub compression: Compression,
    pub size: u64,
    /// Last-modified time, microseconds since the epoch: with the size, how the ledger tells that a
    /// known file is unchanged without reading it.
    pub modified_micros: i64,
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

    /// The [`Checksum`] of the file's bytes, streamed (one GET on object storage); with its SHA-256
    /// too when `legacy` (to compare with what an older ledger recorded), in the same read.
    pub async fn checksum(&self, legacy: bool) -> Result<Checksum, LandingError> {
        let io = |source| LandingError::Io {
            path: self.path.clone(),
            source,
        };
        let mut hasher = Hasher::new(legacy);
        if let Some(path) = self.path.local_path() {
            // Read on a blocking thread, so that several files are hashed at once.
            let path = path.to_path_buf();
            let hashed = tokio::task::spawn_blocking(move || {
                let mut file = std::fs::File::open(path)?;
                let mut buffer = vec![0u8; 1 << 18];
                loop {
                    let n = file.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                }
                Ok::<_, std::io::Error>(hasher)
            })
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
            hasher = hashed.map_err(io)?;
        } else {
            let file = storage::RemoteFile::open(&self.path, self.size)
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let mut chunks = file.stream().await.map_err(io)?;
            while let Some(chunk) = chunks.next().await {
                hasher.update(&chunk.map_err(|e| io(std::io::Error::other(e)))?);
            }
        }
        Ok(hasher.finish())
    }
}

/// What the ingest ledger records of a landing file's content: `blake3:<hex>`. Ledgers written before
/// recorded the bare hex of its SHA-256, which [`Checksum::matches`] still recognizes when the checksum
/// was computed with it (see [`is_legacy`]). Every new file is hashed before it is read to be landed:
/// BLAKE3 takes about a third of SHA-256's CPU for it (0.2 against 0.65 CPU seconds for the 1.2 GB of
/// the 10M-row benchmark, each with the CPU's SIMD or SHA instructions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    recorded: String,
    sha256: Option<String>,
}

impl Checksum {
    /// The value the ledger records.
    pub fn recorded(&self) -> &str {
        &self.recorded
    }

    /// Whether `recorded`, a checksum from a ledger of either format, is this content's. A legacy
    /// value never matches a checksum computed without its SHA-256, nor a value of another format.
    pub fn matches(&self, recorded: &str) -> bool {
        self.in_format_of(recorded) == Some(recorded)
    }

    /// The values a ledger may hold for this content: the current one, and the legacy one if known.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.recorded.as_str()).chain(self.sha256.as_deref())
    }

    /// For an error about a known file whose content changed: the algorithm and the first 12 hex
    /// digits of `recorded` and of this content's checksum in its format; `None` when that was not
    /// computed (a legacy entry of another size: its size tells the change).
    pub fn change_from(&self, recorded: &str) -> Option<String> {
        let short = |hex: &str| hex.get(..12).unwrap_or(hex).to_string();
        let Some(now) = self.in_format_of(recorded) else {
            return match is_legacy(recorded) {
                true => None,
                false => Some(format!(
                    "the ledger's checksum `{recorded}` is of a format this medallion does not know \
                     (written by a newer one?)"
                )),
            };
        };
        let (algorithm, before, after) = match recorded.strip_prefix(BLAKE3_PREFIX) {
            Some(hex) => (
                "blake3",
                hex,
                now.strip_prefix(BLAKE3_PREFIX).unwrap_or(now),
            ),
            None => ("sha256", recorded, now),
        };
        Some(format!("{algorithm} {} → {}", short(before), short(after)))
    }

    /// This content's checksum in the format of `recorded`, when it was computed.
    fn in_format_of(&self, recorded: &str) -> Option<&str> {
        if recorded.starts_with(BLAKE3_PREFIX) {
            Some(&self.recorded)
        } else if is_legacy(recorded) {
            self.sha256.as_deref()
        } else {
            None
        }
    }
}

const BLAKE3_PREFIX: &str = "blake3:";

/// Whether a ledger's checksum is the SHA-256 an older ledger recorded: 64 lowercase hex digits.
pub fn is_legacy(recorded: &str) -> bool {
    recorded.len() == 64
        && recorded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A [`Checksum`] being computed.
struct Hasher {
    blake3: blake3::Hasher,
    sha256: Option<Sha256>,
}

impl Hasher {
    fn new(legacy: bool) -> Self {
        Self {
            blake3: blake3::Hasher::new(),
            sha256: legacy.then(Sha256::new),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.blake3.update(bytes);
        if let Some(sha256) = &mut self.sha256 {
            sha256.update(bytes);
        }
    }

    fn finish(self) -> Checksum {
        Checksum {
            recorded: format!("{BLAKE3_PREFIX}{}", self.blake3.finalize().to_hex()),
            sha256: self.sha256.map(|h| hex::encode(h.finalize())),
        }
    }
}

/// Lists the source's landing files in DMS order. Hidden files (`.x`, `_x`) and files of other formats
/// are ignored. On object storage this is one paged LIST of the prefix.
pub async fn discover(source: &Source) -> Result<Vec<LandingFile>, LandingError> {
    let mut files = Vec::new();
    match source.path.local_path() {
        Some(folder) => {
            if !folder.is_dir() {
                return Err(LandingError::MissingFolder {
                    source_name: source.name.clone(),
                    path: source.path.clone(),
                });
            }
            walk(source, folder, folder, &mut files)?;
        }
        None => {
            let listed = storage::list(&source.path).await.map_err(|source_error| {
                LandingError::Storage {
                    source_name: source.name.clone(),
                    source: source_error,
                }
            })?;
            files.extend(listed.into_iter().filter_map(|object| {
                classify(source, object.relative, object.size, object.modified_micros)
            }));
        }
    }
    files.sort_by_key(LandingFile::order_key);
    Ok(files)
}

fn walk(
    source: &Source,
    root: &Path,
    dir: &Path,
    files: &mut Vec<LandingFile>,
) -> Result<(), LandingError> {
    let io = |source| LandingError::Io {
        path: Location::local(dir),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io)?;
        if file_type.is_dir() {
            let name = entry.file_name();
            if !hidden(&name.to_string_lossy()) {
                walk(source, root, &path, files)?;
            }
            continue;
        }
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let metadata = entry.metadata().map_err(io)?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as i64);
        files.extend(classify(source, relative, metadata.len(), modified));
    }
    Ok(())
}

/// Names starting with `.` or `_` are not landing files (editor files, `_SUCCESS` markers, ...).
fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

/// The landing file at `relative` (`/`-separated, under the source's folder), if it is one: not hidden,
/// and of the source's format (optionally gzipped).
fn classify(
    source: &Source,
    relative: String,
    size: u64,
    modified_micros: i64,
) -> Option<LandingFile> {
    if relative.split('/').any(hidden) {
        return None;
    }
    let name = relative.rsplit('/').next().unwrap_or(&relative);
    let (stem, compression) = match name.strip_suffix(".gz") {
        Some(stem) => (stem, Compression::Gzip),
        None => (name, Compression::None),
    };
    let extension = match source.format {
        FileFormat::Csv => ".csv",
        FileFormat::Parquet => ".parquet",
        FileFormat::Json => ".json",
    };
    let base = stem.strip_suffix(extension)?;
    let kind = match &source.dms {
        Some(_) if base.starts_with("LOAD") => FileKind::FullLoad,
        Some(_) => FileKind::Change,
        None => FileKind::Data,
    };
    Some(LandingFile {
        path: source.path.join(&relative),
        relative,
        kind,
        format: source.format,
        compression,
        size,
        modified_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DmsLayout;

    fn source(dir: &Path) -> Source {
        Source {
            name: "t".into(),
            path: Location::local(dir),
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

    #[tokio::test]
    async fn checksums_are_blake3_with_the_legacy_sha256_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("LOAD00000001.csv"), "abc").unwrap();
        // Larger than one read of the hasher, not a multiple of it.
        let large: Vec<u8> = (0..(1u32 << 20) + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.path().join("LOAD00000002.csv"), &large).unwrap();
        let files = discover(&source(dir.path())).await.unwrap();

        // The published test vectors of "abc".
        let abc_blake3 = "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        let abc_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let plain = files[0].checksum(false).await.unwrap();
        assert_eq!(plain.recorded(), abc_blake3);
        assert!(plain.matches(abc_blake3));
        assert!(!plain.matches(abc_sha256), "no SHA-256 was computed");
        assert_eq!(plain.values().collect::<Vec<_>>(), [abc_blake3]);
        let legacy = files[0].checksum(true).await.unwrap();
        assert_eq!(legacy.recorded(), abc_blake3);
        assert!(legacy.matches(abc_sha256));
        assert!(!legacy.matches(&abc_sha256.replace('b', "c")));
        assert_eq!(
            legacy.values().collect::<Vec<_>>(),
            [abc_blake3, abc_sha256]
        );
        assert!(is_legacy(abc_sha256) && !is_legacy(abc_blake3));
        assert!(!is_legacy("") && !is_legacy(&abc_sha256.to_uppercase()) && !is_legacy("xxh3:12"));
        // A value of no known format matches nothing.
        assert!(!legacy.matches("") && !legacy.matches("xxh3:12"));

        // What an error about a changed file says.
        let other_sha256 = "0".repeat(64);
        assert_eq!(
            legacy.change_from(&other_sha256).unwrap(),
            "sha256 000000000000 → ba7816bf8f01"
        );
        assert_eq!(
            plain.change_from("blake3:00").unwrap(),
            "blake3 00 → 6437b3ac3846"
        );
        assert_eq!(plain.change_from(&other_sha256), None);
        assert!(
            plain
                .change_from("xxh3:12")
                .unwrap()
                .contains("does not know")
        );

        let streamed = files[1].checksum(true).await.unwrap();
        assert_eq!(
            streamed.recorded(),
            format!("blake3:{}", blake3::hash(&large).to_hex())
        );
        assert!(streamed.matches(&hex::encode(Sha256::digest(&large))));
        assert!(!streamed.matches(abc_blake3));
    }

    #[tokio::test]
    async fn dms_order_is_full_load_then_changes_by_path() {
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
        let files = discover(&source(dir.path())).await.unwrap();
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
