//! Chunked transfers: splitting a payload into protocol chunks, and reassembling and
//! verifying one on the receiving side.
//!
//! A sender slices its payload (a safetensors file held as [`Bytes`]) into chunks of at most
//! [`DEFAULT_CHUNK_BYTES`] without copying. A receiver feeds chunks to an [`Assembler`], which
//! checks every chunk against the announced size and order as it arrives — so an oversized or
//! disordered transfer is refused at its first bad chunk, before it can use memory — writes
//! them to a sink of the receiver's choice (memory or a spill file), and hashes them on the
//! way; [`Assembler::finish`] accepts the payload only if the SHA-256 matches.

use std::io::Write;

use prost::bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::v1::{ModelChunk, UpdateChunk, UpdateHeader, update_chunk};

/// Default payload bytes per chunk (1 MiB).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Largest gRPC message either side accepts: one full chunk plus room for the other fields.
/// Set it as both the encoding and decoding limit on clients and servers.
pub const MAX_MESSAGE_BYTES: usize = DEFAULT_CHUNK_BYTES + 64 * 1024;

/// Why a transfer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    /// The announced size exceeds what the receiver accepts.
    #[error("transfer of {total} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced size.
        total: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// A chunk does not start where the previous one ended.
    #[error("chunk at offset {got} is out of order: expected offset {expected}")]
    OutOfOrder {
        /// Where the next chunk had to start.
        expected: u64,
        /// Where it started.
        got: u64,
    },
    /// A chunk is larger than the agreed chunk size.
    #[error("chunk of {len} bytes exceeds the chunk limit of {limit} bytes")]
    ChunkTooLarge {
        /// Payload bytes in the chunk.
        len: usize,
        /// The agreed maximum.
        limit: usize,
    },
    /// Chunks run past the announced size.
    #[error("chunks run to byte {end}, past the announced {total} bytes")]
    Overrun {
        /// Where the offending chunk ends.
        end: u64,
        /// Announced size.
        total: u64,
    },
    /// The stream ended before the announced size was reached.
    #[error("transfer ended after {got} of {total} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Announced size.
        total: u64,
    },
    /// The received bytes do not hash to the announced SHA-256.
    #[error("content hash mismatch: announced {expected}, received {got}")]
    HashMismatch {
        /// Announced hash.
        expected: String,
        /// Hash of what arrived.
        got: String,
    },
    /// Writing to the receiver's sink failed.
    #[error("cannot store the transfer: {0}")]
    Sink(String),
    /// The messages of an upload came in the wrong order (no header first, or something
    /// other than data after it).
    #[error("{0}")]
    Malformed(&'static str),
}

/// Whose fault a [`TransferError`] is, which decides how it is reported to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The sender exceeded a size limit (total or chunk).
    Limit,
    /// The sender sent something inconsistent (order, length, hash, message kinds).
    Sender,
    /// The receiver could not store what it received: not the sender's fault.
    Receiver,
}

/// Why receiving an upload stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream itself failed (cancelled, reset, undecodable message).
    #[error("the upload stream failed: {0}")]
    Stream(#[from] tonic::Status),
    /// The transfer was refused.
    #[error(transparent)]
    Refused(#[from] TransferError),
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Zero-copy slices of `payload`, each at most `chunk_bytes` long (one empty slice for an
/// empty payload, so every transfer has at least one message).
fn slices(payload: &Bytes, chunk_bytes: usize) -> impl Iterator<Item = (u64, Bytes)> + '_ {
    let chunk_bytes = chunk_bytes.max(1);
    let count = payload.len().div_ceil(chunk_bytes).max(1);
    (0..count).map(move |i| {
        let start = (i * chunk_bytes).min(payload.len());
        let end = (start + chunk_bytes).min(payload.len());
        (start as u64, payload.slice(start..end))
    })
}

/// The chunks of a global model for `DownloadModel`, starting at byte `offset`.
pub fn model_chunks(
    run_id: &str,
    round: u64,
    sha256: &str,
    payload: &Bytes,
    offset: u64,
    chunk_bytes: usize,
) -> Vec<ModelChunk> {
    let start = (offset as usize).min(payload.len());
    let rest = payload.slice(start..);
    slices(&rest, chunk_bytes)
        .map(|(at, data)| ModelChunk {
            run_id: run_id.to_string(),
            round,
            sha256: sha256.to_string(),
            total_bytes: payload.len() as u64,
            offset: start as u64 + at,
            data,
        })
        .collect()
}

/// The messages of an `UploadUpdate` stream: the header, then the payload's chunks.
pub fn update_chunks(
    header: UpdateHeader,
    payload: &Bytes,
    chunk_bytes: usize,
) -> Vec<UpdateChunk> {
    let mut out = vec![UpdateChunk {
        part: Some(update_chunk::Part::Header(header)),
    }];
    out.extend(
        slices(payload, chunk_bytes)
            .filter(|(_, d)| !d.is_empty())
            .map(|(_, data)| UpdateChunk {
                part: Some(update_chunk::Part::Data(data)),
            }),
    );
    out
}

/// Reassembles a chunked payload into `sink`, checking size and order chunk by chunk and
/// the SHA-256 at the end.
#[derive(Debug)]
pub struct Assembler<W> {
    sink: W,
    hasher: Sha256,
    expected_sha256: String,
    total: u64,
    received: u64,
    chunk_limit: usize,
}

impl<W: Write> Assembler<W> {
    /// Starts a transfer of `total` bytes hashing to `expected_sha256` (hex), refusing it at
    /// once if `total` exceeds `limit`; chunks may carry at most `chunk_limit` bytes.
    pub fn new(
        sink: W,
        expected_sha256: &str,
        total: u64,
        limit: u64,
        chunk_limit: usize,
    ) -> Result<Self, TransferError> {
        if total > limit {
            return Err(TransferError::TooLarge { total, limit });
        }
        Ok(Assembler {
            sink,
            hasher: Sha256::new(),
            expected_sha256: expected_sha256.to_ascii_lowercase(),
            total,
            received: 0,
            chunk_limit,
        })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Adds the chunk that starts at `offset`.
    pub fn push(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        if offset != self.received {
            return Err(TransferError::OutOfOrder {
                expected: self.received,
                got: offset,
            });
        }
        if data.len() > self.chunk_limit {
            return Err(TransferError::ChunkTooLarge {
                len: data.len(),
                limit: self.chunk_limit,
            });
        }
        let end = self.received + data.len() as u64;
        if end > self.total {
            return Err(TransferError::Overrun {
                end,
                total: self.total,
            });
        }
        self.sink
            .write_all(data)
            .map_err(|e| TransferError::Sink(e.to_string()))?;
        self.hasher.update(data);
        self.received = end;
        Ok(())
    }

    /// Adds the next chunk of a stream without offsets (update uploads).
    pub fn push_next(&mut self, data: &[u8]) -> Result<(), TransferError> {
        self.push(self.received, data)
    }

    /// Ends the transfer: all bytes must have arrived and hash to the announced value.
    /// Returns the sink holding the payload.
    pub fn finish(mut self) -> Result<W, TransferError> {
        if self.received != self.total {
            return Err(TransferError::Truncated {
                got: self.received,
                total: self.total,
            });
        }
        let got = hex(&self.hasher.finalize());
        if got != self.expected_sha256 {
            return Err(TransferError::HashMismatch {
                expected: self.expected_sha256,
                got,
            });
        }
        self.sink
            .flush()
            .map_err(|e| TransferError::Sink(e.to_string()))?;
        Ok(self.sink)
    }
}

impl TransferError {
    /// Whose fault the refusal is: a size limit, the sender's inconsistency, or the
    /// receiver's own storage.
    pub fn fault(&self) -> Fault {
        match self {
            TransferError::TooLarge { .. } | TransferError::ChunkTooLarge { .. } => Fault::Limit,
            TransferError::Sink(_) => Fault::Receiver,
            TransferError::OutOfOrder { .. }
            | TransferError::Overrun { .. }
            | TransferError::Truncated { .. }
            | TransferError::HashMismatch { .. }
            | TransferError::Malformed(_) => Fault::Sender,
        }
    }
}

/// Receives an `UploadUpdate` stream: the header, then the data chunks, assembled in memory
/// with every check of [`Assembler`]. Returns the header and the payload once its SHA-256
/// matched; `limit` caps the announced size, `chunk_limit` each chunk.
pub async fn receive_update(
    stream: &mut tonic::Streaming<UpdateChunk>,
    limit: u64,
    chunk_limit: usize,
) -> Result<(UpdateHeader, Vec<u8>), ReceiveError> {
    receive_update_into(stream, Vec::new(), limit, chunk_limit).await
}

/// [`receive_update`] into any sink, e.g. a spill file, so that an upload never has to be
/// held in memory whole. Returns the header and the (flushed) sink once the payload's
/// SHA-256 matched; on error the sink holds a partial payload the caller must discard.
pub async fn receive_update_into<W: Write + Send + 'static>(
    stream: &mut tonic::Streaming<UpdateChunk>,
    sink: W,
    limit: u64,
    chunk_limit: usize,
) -> Result<(UpdateHeader, W), ReceiveError> {
    let Some(UpdateChunk {
        part: Some(update_chunk::Part::Header(header)),
    }) = stream.message().await?
    else {
        return Err(
            TransferError::Malformed("the first message of an upload must be its header").into(),
        );
    };
    let mut asm = Assembler::new(
        sink,
        &header.delta_sha256,
        header.total_bytes,
        limit,
        chunk_limit,
    )?;
    // Hashing and writing (the spill to disk) run on a blocking thread, off the executor,
    // while the next chunks arrive: a bounded channel of SPILL_QUEUE chunks between them, then
    // `None` once the stream ended well. The worker answers `Err` for a refused chunk (which
    // came before anything the receiver saw later, so it is the answer), `Ok(None)` when the
    // receiver stopped early, and `Ok(Some(..))` with the assembled upload's verdict.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<prost::bytes::Bytes>>(SPILL_QUEUE);
    type Verdict<W> = Result<Option<Result<W, TransferError>>, TransferError>;
    let worker = tokio::task::spawn_blocking(move || -> Verdict<W> {
        while let Some(next) = rx.blocking_recv() {
            match next {
                Some(d) => asm.push_next(&d)?,
                None => return Ok(Some(asm.finish())),
            }
        }
        Ok(None)
    });
    let received: Result<(), ReceiveError> = async {
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(update_chunk::Part::Data(d)) => {
                    if tx.send(Some(d)).await.is_err() {
                        // The worker stopped on a refused chunk: its error is the answer.
                        return Ok(());
                    }
                }
                _ => {
                    return Err(
                        TransferError::Malformed("only data chunks may follow the header").into(),
                    );
                }
            }
        }
        // The worker may have stopped already (its error is then the answer).
        let _ = tx.send(None).await;
        Ok(())
    }
    .await;
    drop(tx);
    let verdict = worker
        .await
        .map_err(|e| TransferError::Sink(format!("the spill worker failed: {e}")))?;
    // In stream order: a refused chunk, then what the receiver saw, then the whole upload.
    match (verdict?, received) {
        (_, Err(e)) => Err(e),
        (Some(done), Ok(())) => Ok((header, done?)),
        (None, Ok(())) => Err(TransferError::Sink("the spill worker stopped early".into()).into()),
    }
}

/// Chunks queued between an upload's receiver and its spill worker.
const SPILL_QUEUE: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
    }

    fn receive(chunks: &[ModelChunk], limit: u64) -> Result<Vec<u8>, TransferError> {
        let first = &chunks[0];
        let mut a = Assembler::new(Vec::new(), &first.sha256, first.total_bytes, limit, 1000)?;
        for c in chunks {
            a.push(c.offset, &c.data)?;
        }
        a.finish()
    }

    #[test]
    fn model_round_trips_for_sizes_around_the_chunk_size() {
        for n in [0, 1, 999, 1000, 1001, 3500] {
            let p = payload(n);
            let sha = sha256_hex(&p);
            let chunks = model_chunks("run", 3, &sha, &p, 0, 1000);
            assert_eq!(chunks.len(), n.div_ceil(1000).max(1), "n = {n}");
            assert!(
                chunks
                    .iter()
                    .all(|c| c.data.len() <= 1000 && c.round == 3 && c.total_bytes == n as u64)
            );
            assert_eq!(receive(&chunks, 1 << 20).unwrap(), p.to_vec());
        }
    }

    #[test]
    fn chunks_share_the_payload_instead_of_copying_it() {
        let p = payload(2500);
        let chunks = model_chunks("run", 1, "x", &p, 0, 1000);
        assert_eq!(chunks[1].data.as_ptr(), p[1000..].as_ptr());
    }

    #[test]
    fn a_download_resumes_from_an_offset() {
        let p = payload(2500);
        let sha = sha256_hex(&p);
        let chunks = model_chunks("run", 1, &sha, &p, 1200, 1000);
        assert_eq!(
            chunks.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![1200, 2200]
        );
        let mut a = Assembler::new(Vec::new(), &sha, 2500, 1 << 20, 1000).unwrap();
        a.push(0, &p[..1000]).unwrap();
        a.push(1000, &p[1000..1200]).unwrap();
        for c in &chunks {
            a.push(c.offset, &c.data).unwrap();
        }
        assert_eq!(a.finish().unwrap(), p.to_vec());
    }

    #[test]
    fn every_bad_transfer_is_refused_with_its_reason() {
        let p = payload(2500);
        let sha = sha256_hex(&p);
        let chunks = model_chunks("run", 1, &sha, &p, 0, 1000);

        assert_eq!(
            receive(&chunks, 2000),
            Err(TransferError::TooLarge {
                total: 2500,
                limit: 2000
            })
        );

        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        assert_eq!(
            receive(&swapped, 1 << 20),
            Err(TransferError::OutOfOrder {
                expected: 0,
                got: 1000
            })
        );

        assert_eq!(
            receive(&chunks[..2], 1 << 20),
            Err(TransferError::Truncated {
                got: 2000,
                total: 2500
            })
        );

        let mut corrupt = chunks.clone();
        let mut bytes = corrupt[1].data.to_vec();
        bytes[7] ^= 1;
        corrupt[1].data = Bytes::from(bytes);
        assert!(matches!(
            receive(&corrupt, 1 << 20),
            Err(TransferError::HashMismatch { .. })
        ));

        let mut a = Assembler::new(Vec::new(), &sha, 10, 1 << 20, 1000).unwrap();
        assert_eq!(
            a.push(0, &p[..11]),
            Err(TransferError::Overrun { end: 11, total: 10 })
        );
        assert_eq!(a.received(), 0, "a refused chunk is not kept");

        let mut a = Assembler::new(Vec::new(), &sha, 2500, 1 << 20, 100).unwrap();
        assert_eq!(
            a.push(0, &p[..101]),
            Err(TransferError::ChunkTooLarge {
                len: 101,
                limit: 100
            })
        );
    }

    #[test]
    fn update_stream_is_one_header_then_ordered_data() {
        let p = payload(2100);
        let header = UpdateHeader {
            delta_sha256: sha256_hex(&p),
            total_bytes: p.len() as u64,
            round: 4,
            ..Default::default()
        };
        let msgs = update_chunks(header, &p, 1000);
        assert_eq!(msgs.len(), 4);
        let Some(update_chunk::Part::Header(h)) = &msgs[0].part else {
            panic!("first message must be the header")
        };
        let mut a =
            Assembler::new(Vec::new(), &h.delta_sha256, h.total_bytes, 1 << 20, 1000).unwrap();
        for m in &msgs[1..] {
            let Some(update_chunk::Part::Data(d)) = &m.part else {
                panic!("data after the header")
            };
            a.push_next(d).unwrap();
        }
        assert_eq!(a.finish().unwrap(), p.to_vec());
    }
}

#[cfg(test)]
mod proptests;
