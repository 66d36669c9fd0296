//! Bulk transfers on the coordinator's side: uploads spill to files as they arrive, models
//! stream from their checkpoint files, and a fixed number of transfer slots bounds the
//! memory in flight whatever the number of sites.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fedflow_proto::v1::ModelChunk;
use prost::bytes::Bytes;
use tokio::sync::Semaphore;
use tonic::Status;

/// The data directory's spill folder for uploads being received.
pub const INCOMING_DIR: &str = "incoming";

/// How many model downloads, and separately how many uploads, are in flight at once. Each
/// holds a few chunks in transport buffers, so this bounds the coordinator's transfer memory
/// whatever the number of sites; the others wait their turn (a few fast transfers saturate
/// a machine's cores and disk anyway).
pub const TRANSFER_SLOTS: usize = 8;

/// Distinguishes spill files within a process.
static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An upload's spill file in `<data>/incoming`, removed when dropped: after the engine has
/// answered, and on every error path.
#[derive(Debug)]
pub(super) struct SpillFile {
    pub(super) path: PathBuf,
}

impl SpillFile {
    pub(super) fn create(dir: &Path) -> std::io::Result<(SpillFile, std::fs::File)> {
        let n = SPILL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("upload-{n}.part"));
        let file = std::fs::File::create_new(&path)?;
        Ok((SpillFile { path }, file))
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove spill file {}: {e}", self.path.display());
        }
    }
}

/// Empties (or creates) the spill directory: files there are uploads a previous process was
/// receiving when it stopped, never accepted.
pub(super) fn reset_incoming(dir: &Path) -> crate::Result<()> {
    let fail = |e: std::io::Error| crate::Error::io(dir, e);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    std::fs::create_dir_all(dir).map_err(fail)
}

/// How [`stream_model`] sends.
#[derive(Debug)]
pub(super) struct StreamSettings {
    /// Bytes per chunk.
    pub(super) chunk_bytes: usize,
    /// The download slots.
    pub(super) slots: Arc<Semaphore>,
    /// Give up when the receiver stops reading this long.
    pub(super) stall: Duration,
    /// Counts the bytes sent.
    pub(super) sent: prometheus_client::metrics::counter::Counter,
}

/// Streams a model file as `DownloadModel` chunks (laid out like `header`, starting at its
/// offset) into `tx`, one chunk read at a time, once one of the download slots is free.
/// Gives up when the receiver goes away or stops reading for `stall`.
///
/// The slot is held until the response stream has been dropped (gRPC has taken the last
/// chunk and ended the response: `dropped` resolves), not merely until the last chunk is in the channel: a
/// model that fits in one or two chunks would otherwise free its slot at once, and every
/// download would hold its chunks in transport buffers at the same time, a model's worth per
/// connected site.
pub(super) async fn stream_model(
    file: std::fs::File,
    header: ModelChunk,
    how: StreamSettings,
    tx: tokio::sync::mpsc::Sender<Result<ModelChunk, Status>>,
    dropped: tokio::sync::oneshot::Receiver<()>,
) {
    let StreamSettings {
        chunk_bytes,
        slots,
        stall,
        sent,
    } = how;
    // Waiting for a slot ends when the site goes away.
    let slot = tokio::select! {
        s = slots.acquire_owned() => s,
        () = tx.closed() => return,
    };
    let Ok(_slot) = slot else {
        return;
    };
    let total = header.total_bytes;
    let mut offset = header.offset;
    let mut file = Some(file);
    loop {
        let n = (chunk_bytes.max(1) as u64).min(total - offset) as usize;
        let Some(f) = file.take() else { return };
        // Allocated here, on a runtime worker, and filled on a blocking thread: the chunk is
        // freed on a worker too (once sent), so it goes back to the workers' allocator heaps
        // instead of piling up, freed from afar, in the heaps of idle blocking threads.
        let mut buf = vec![0u8; n];
        let read = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = f;
            let r = f
                .seek(SeekFrom::Start(offset))
                .and_then(|_| f.read_exact(&mut buf));
            (f, r.map(|()| buf))
        })
        .await;
        let msg = match read {
            Ok((f, Ok(buf))) => {
                file = Some(f);
                Ok(ModelChunk {
                    offset,
                    data: Bytes::from(buf),
                    ..header.clone()
                })
            }
            Ok((_, Err(e))) => {
                Err(crate::Error::Store(format!("cannot read the model: {e}")).into())
            }
            Err(e) => Err(crate::Error::Store(format!("cannot read the model: {e}")).into()),
        };
        let failed = msg.is_err();
        match tokio::time::timeout(stall, tx.send(msg)).await {
            Ok(Ok(())) if !failed => {
                sent.inc_by(n as u64);
            }
            Ok(Ok(())) => {}
            // The site went away, or stopped reading: free the slot.
            Ok(Err(_)) | Err(_) => return,
        }
        offset += n as u64;
        if failed || offset >= total {
            break;
        }
    }
    // End the stream, and keep the slot until the transport has taken the last chunk and
    // dropped the response stream (and with it `dropped`'s sender).
    drop(tx);
    let _ = tokio::time::timeout(stall, dropped).await;
}

/// The response stream of a download: the chunks `stream_model` sends, holding the sender
/// whose drop tells `stream_model` that the transport is done with the response.
pub(super) fn download_stream(
    rx: tokio::sync::mpsc::Receiver<Result<ModelChunk, Status>>,
    guard: tokio::sync::oneshot::Sender<()>,
) -> DownloadStream {
    use tokio_stream::StreamExt;
    Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(move |chunk| {
            let _held = &guard;
            chunk
        }),
    )
}

/// What `DownloadModel` answers with (see [`download_stream`]).
pub(super) type DownloadStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ModelChunk, Status>> + Send>>;
