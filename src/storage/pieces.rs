//! Local files written in pieces of at most [`PIECE`] bytes per `write` call.
//!
//! On some Linux kernels a single `write` of 2 MiB or more into the page cache costs far more than the
//! same bytes written 1 MiB at a time: on this project's benchmark machine (Linux 6.18 in a Firecracker
//! VM) 256 MiB take 1.5 s of system time in 2 MiB writes and 0.06 s in 1 MiB writes. delta-rs hands a
//! whole Parquet file (tens of MiB) to the object store as one buffer, and `LocalFileSystem` writes each
//! buffer of a payload with one `write_all`, so every table write paid that price. [`Pieces`] wraps the
//! local store and cuts payloads into pieces without copying them; [`PieceWriter`] does the same for
//! files written through `std::io::Write` (the scratch, local copies). Reads and everything else go straight through.

use std::{fmt, io::Write, ops::Range, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
    path::Path,
};

/// The largest write handed to the kernel.
pub const PIECE: usize = 1 << 20;

/// `payload` as the same bytes in pieces of at most [`PIECE`] (slices of its buffers, not copies).
pub fn in_pieces(payload: PutPayload) -> PutPayload {
    if payload.iter().all(|part| part.len() <= PIECE) {
        return payload;
    }
    payload
        .into_iter()
        .flat_map(|part: Bytes| {
            let len = part.len();
            (0..len)
                .step_by(PIECE)
                .map(move |start| part.slice(start..len.min(start + PIECE)))
        })
        .collect()
}

/// An object store whose writes reach the inner store in pieces (see the module's documentation).
#[derive(Debug)]
pub struct Pieces {
    inner: Arc<dyn ObjectStore>,
}

impl Pieces {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner }
    }
}

impl fmt::Display for Pieces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for Pieces {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner
            .put_opts(location, in_pieces(payload), opts)
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(PiecesUpload { inner }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[derive(Debug)]
struct PiecesUpload {
    inner: Box<dyn MultipartUpload>,
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl MultipartUpload for PiecesUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(in_pieces(data))
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

/// A writer that hands its inner writer at most [`PIECE`] bytes per call (see the module's
/// documentation). A short write is allowed by [`Write::write`]; `write_all` loops over it.
#[derive(Debug)]
pub struct PieceWriter<W>(pub W);

impl<W: Write> Write for PieceWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(PIECE)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use object_store::{ObjectStoreExt, local::LocalFileSystem};

    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_payload_is_cut_into_pieces_that_hold_the_same_bytes_in_order() {
        let big = bytes(3 * PIECE + 17);
        let small = bytes(5);
        let payload: PutPayload = [Bytes::from(big.clone()), Bytes::from(small.clone())]
            .into_iter()
            .collect();
        let pieces = in_pieces(payload);
        let lens: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(lens, vec![PIECE, PIECE, PIECE, 17, 5]);
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(joined, [big, small].concat());
    }

    #[test]
    fn a_writer_hands_on_at_most_one_piece_per_call() -> std::io::Result<()> {
        let mut writer = PieceWriter(Vec::new());
        let data = bytes(2 * PIECE + 3);
        assert_eq!(writer.write(&data)?, PIECE);
        writer.0.clear();
        writer.write_all(&data)?;
        assert_eq!(writer.0, data);
        Ok(())
    }

    #[tokio::test]
    async fn files_written_in_pieces_read_back_whole() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| object_store::Error::Generic {
            store: "test",
            source: Box::new(e),
        })?;
        let store = Pieces::new(Arc::new(LocalFileSystem::new_with_prefix(dir.path())?));
        let data = bytes(2 * PIECE + 1234);

        store.put(&Path::from("put"), data.clone().into()).await?;
        assert_eq!(store.get(&Path::from("put")).await?.bytes().await?, data);

        let mut upload = store.put_multipart(&Path::from("multipart")).await?;
        upload.put_part(data[..PIECE + 1].to_vec().into()).await?;
        upload.put_part(data[PIECE + 1..].to_vec().into()).await?;
        upload.complete().await?;
        assert_eq!(
            store.get(&Path::from("multipart")).await?.bytes().await?,
            data
        );
        Ok(())
    }
}
