//! Reading one object of object storage from the blocking threads that parse landing files: a streaming
//! `Read` for CSV and JSON (one GET, never held whole in memory), and ranged GETs for Parquet, which reads
//! its footer and then only the column chunks it needs.

use std::{
    io::{self, Read, Write},
    sync::Arc,
};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use parquet::file::reader::{ChunkReader, Length};

use super::{Location, PieceWriter, StorageError};

/// The first storage failure seen while reading one object. Parsers wrap I/O errors in their own (CSV,
/// Parquet), so the reader notes the failure here: the caller can then tell "storage did not answer"
/// (run again later) from "the file is bad" (set it aside).
#[derive(Clone, Default)]
pub struct ReadFailure(Arc<std::sync::Mutex<Option<String>>>);

impl ReadFailure {
    fn record(&self, error: &object_store::Error) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert_with(|| super::error_chain(error));
        }
    }

    /// What failed, if storage failed.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// One object, read from a blocking thread of the tokio runtime.
#[derive(Clone)]
pub struct RemoteFile {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
    runtime: tokio::runtime::Handle,
    failure: ReadFailure,
}

impl RemoteFile {
    /// The object at `location`, of `size` bytes. Must be called on a thread of the tokio runtime.
    pub fn open(location: &Location, size: u64) -> Result<RemoteFile, StorageError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| StorageError::Access {
            location: location.to_string(),
            problem: format!("no async runtime to read with: {e}"),
        })?;
        let (store, path) = split(location)?;
        Ok(RemoteFile {
            store,
            path,
            size,
            runtime,
            failure: ReadFailure::default(),
        })
    }

    /// Storage failures of every read from this object (and its clones).
    pub fn failure(&self) -> ReadFailure {
        self.failure.clone()
    }

    /// The object's bytes as an async stream (for callers on the runtime).
    pub async fn stream(&self) -> io::Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let result = self.store.get(&self.path).await.map_err(io::Error::other)?;
        Ok(result.into_stream())
    }

    /// The object's bytes from `start` to its end, as a blocking reader (for blocking threads).
    pub fn reader_from(&self, start: u64) -> io::Result<StreamRead> {
        let options = object_store::GetOptions {
            range: (start > 0).then_some(object_store::GetRange::Offset(start)),
            ..Default::default()
        };
        let result = self
            .runtime
            .block_on(self.store.get_opts(&self.path, options))
            .map_err(|e| {
                self.failure.record(&e);
                io::Error::other(e)
            })?;
        Ok(StreamRead {
            stream: result.into_stream(),
            current: Bytes::new(),
            runtime: self.runtime.clone(),
            failure: self.failure.clone(),
        })
    }
}

impl Length for RemoteFile {
    fn len(&self) -> u64 {
        self.size
    }
}

impl ChunkReader for RemoteFile {
    type T = StreamRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<StreamRead> {
        self.reader_from(start)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.runtime
            .block_on(
                self.store
                    .get_range(&self.path, start..start + length as u64),
            )
            .map_err(|e| {
                self.failure.record(&e);
                parquet::errors::ParquetError::External(Box::new(e))
            })
    }
}

/// A GET response body as a blocking `Read`.
pub struct StreamRead {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
    runtime: tokio::runtime::Handle,
    failure: ReadFailure,
}

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => {
                    self.failure.record(&e);
                    return Err(io::Error::other(e));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The store of `location`'s parent and the object's path in it.
fn split(location: &Location) -> Result<(Arc<dyn ObjectStore>, ObjectPath), StorageError> {
    let url = location.url()?;
    let bucket = Location::parse(
        &format!("s3://{}", url.host_str().unwrap_or_default()),
        std::path::Path::new("."),
        location.storage.clone(),
    )?;
    // The URL's path is percent-encoded; the object path is not.
    let path = ObjectPath::from_url_path(url.path()).map_err(|e| location.access(e.to_string()))?;
    Ok((bucket.store()?, path))
}

/// The whole object at `location` (for small files: lookups, quarantined copies).
pub async fn read_all(location: &Location) -> Result<Bytes, StorageError> {
    if let Some(path) = location.local_path() {
        return tokio::fs::read(path)
            .await
            .map(Bytes::from)
            .map_err(|e| location.access(e.to_string()));
    }
    let (store, path) = split(location)?;
    let result = store.get(&path).await.map_err(|e| location.error(&e))?;
    result.bytes().await.map_err(|e| location.error(&e))
}

/// Writes `bytes` as the object at `location`, replacing it.
pub async fn write_all(location: &Location, bytes: Bytes) -> Result<(), StorageError> {
    if let Some(path) = location.local_path() {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| location.access(e.to_string()))?;
        }
        let path = path.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            PieceWriter(std::fs::File::create(&path)?).write_all(&bytes)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        return written.map_err(|e| location.access(e.to_string()));
    }
    let (store, path) = split(location)?;
    store
        .put(&path, bytes.into())
        .await
        .map(|_| ())
        .map_err(|e| location.error(&e))
}

/// One object found by [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Path relative to the listed location, `/`-separated.
    pub relative: String,
    pub size: u64,
    pub modified_micros: i64,
}

/// Every object under the object-storage `location`, recursively.
pub async fn list(location: &Location) -> Result<Vec<Listed>, StorageError> {
    let (store, path) = split(location)?;
    let prefix = path.to_string();
    let mut listed = Vec::new();
    let mut objects = store.list(Some(&path));
    while let Some(meta) = objects.next().await {
        let meta = meta.map_err(|e| location.error(&e))?;
        let full = meta.location.to_string();
        let relative = full
            .strip_prefix(&prefix)
            .unwrap_or(&full)
            .trim_start_matches('/')
            .to_string();
        listed.push(Listed {
            relative,
            size: meta.size,
            modified_micros: meta.last_modified.timestamp_micros(),
        });
    }
    Ok(listed)
}

/// Whether any object exists under the object-storage `location` (one LIST of at most a page).
pub async fn any_under(location: &Location) -> Result<bool, StorageError> {
    let (store, path) = split(location)?;
    let mut objects = store.list(Some(&path));
    match objects.next().await {
        None => Ok(false),
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(location.error(&e)),
    }
}

/// Copies the object or file at `from` to `to` (a local copy on disk; otherwise read whole and written,
/// which is how bad landing files reach quarantine, across stores if need be).
pub async fn copy(from: &Location, to: &Location) -> Result<(), StorageError> {
    if let (Some(source), Some(target)) = (from.local_path(), to.local_path()) {
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| to.access(e.to_string()))?;
        }
        return tokio::fs::copy(source, target)
            .await
            .map(|_| ())
            .map_err(|e| from.access(e.to_string()));
    }
    write_all(to, read_all(from).await?).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Storage;

    #[tokio::test]
    async fn a_local_write_replaces_the_file_with_every_byte()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let base = Location::parse(
            &dir.path().to_string_lossy(),
            std::path::Path::new("."),
            Arc::new(Storage::default()),
        )?;
        let target = base.join("quarantine").join("LOAD1.csv");
        let long: Vec<u8> = (0..(5 << 19) + 7).map(|i| (i % 241) as u8).collect();
        write_all(&target, Bytes::from(long.clone())).await?;
        assert_eq!(read_all(&target).await?, long);
        write_all(&target, Bytes::from_static(b"short")).await?;
        assert_eq!(read_all(&target).await?, Bytes::from_static(b"short"));
        Ok(())
    }
}
