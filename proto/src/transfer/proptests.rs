//! Property tests of the receiving side of chunked transfers: the [`Assembler`] and
//! [`receive_update_into`] on arbitrary chunk sequences (sizes, offsets, totals, limits,
//! hashes, failing sinks), checked against a small model of the rules they promise.

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use super::*;

/// A sink whose bytes stay visible to the test after it is handed to an [`Assembler`], and
/// which refuses (atomically, writing nothing) any write that would take it past `cap` bytes.
#[derive(Clone)]
struct SharedSink {
    bytes: Rc<RefCell<Vec<u8>>>,
    cap: usize,
}

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() + buf.len() > self.cap {
            return Err(std::io::Error::other("disk full"));
        }
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a pushed chunk claims to start.
#[derive(Clone, Debug)]
enum At {
    /// Where the assembler expects the next chunk (`push_next`).
    Next,
    /// An explicit offset (`push`), right or wrong.
    Offset(u64),
}

/// What a pushed chunk holds.
#[derive(Clone, Debug)]
enum Data {
    /// The next `len` bytes of the payload the hash was computed over (clamped to its end).
    Payload(usize),
    /// Arbitrary bytes.
    Garbage(Vec<u8>),
}

/// The announced hash of a transfer.
#[derive(Clone, Debug)]
enum Hash {
    /// SHA-256 of the payload, lowercase.
    Right,
    /// SHA-256 of the payload in uppercase (hex is case-insensitive).
    Upper,
    /// Any other text (empty, short, random).
    Other(String),
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        4 => Just(At::Next),
        1 => (0u64..700).prop_map(At::Offset),
        1 => any::<u64>().prop_map(At::Offset),
    ]
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        4 => (0usize..300).prop_map(Data::Payload),
        1 => vec(any::<u8>(), 0..300).prop_map(Data::Garbage),
    ]
}

fn hash() -> impl Strategy<Value = Hash> {
    prop_oneof![
        4 => Just(Hash::Right),
        1 => Just(Hash::Upper),
        1 => "[0-9a-fA-F]{0,70}".prop_map(Hash::Other),
    ]
}

/// The error the rules of [`Assembler::push`] give for a chunk of `len` bytes at `offset`
/// after `received` bytes of `total`, or `None` when it is accepted.
fn expected_refusal(
    received: u64,
    total: u64,
    chunk_limit: usize,
    offset: u64,
    len: usize,
) -> Option<TransferError> {
    if offset != received {
        Some(TransferError::OutOfOrder {
            expected: received,
            got: offset,
        })
    } else if len > chunk_limit {
        Some(TransferError::ChunkTooLarge {
            len,
            limit: chunk_limit,
        })
    } else if received + len as u64 > total {
        Some(TransferError::Overrun {
            end: received + len as u64,
            total,
        })
    } else {
        None
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// On arbitrary chunk sequences (right and wrong offsets, arbitrary sizes and contents,
    /// announced totals around the payload's size, any limit, any hash, a sink that may fail)
    /// the assembler never panics and does exactly what its rules say: a transfer over the
    /// limit is refused up front; each chunk is refused when out of order, over the chunk
    /// limit or running past the total (in that order of precedence) and a refused chunk
    /// changes nothing (`received()` and the sink are untouched); `finish` accepts only all
    /// announced bytes hashing to the announced value (case-insensitively), and returns
    /// exactly the accepted bytes. Every refusal has a non-empty message and the right gRPC
    /// status code.
    #[test]
    fn assembler_enforces_size_order_and_hash_on_arbitrary_chunks(
        payload in vec(any::<u8>(), 0..600),
        total_delta in prop_oneof![4 => Just(0i64), 1 => -50i64..50],
        limit in prop_oneof![4 => Just(u64::MAX), 1 => 0u64..700],
        chunk_limit in prop_oneof![3 => 1usize..300, 1 => Just(0usize), 1 => Just(usize::MAX)],
        announced in hash(),
        sink_cap in prop_oneof![4 => Just(usize::MAX), 1 => 0usize..700],
        chunks in vec((at(), data()), 0..12),
    ) {
        let total = (payload.len() as i64 + total_delta).max(0) as u64;
        let right = sha256_hex(&payload);
        let expected_sha = match &announced {
            Hash::Right => right.clone(),
            Hash::Upper => right.to_ascii_uppercase(),
            Hash::Other(s) => s.clone(),
        };
        let sink = SharedSink { bytes: Rc::default(), cap: sink_cap };
        let mut asm = match Assembler::new(sink.clone(), &expected_sha, total, limit, chunk_limit) {
            Err(e) => {
                prop_assert!(total > limit);
                prop_assert_eq!(&e, &TransferError::TooLarge { total, limit });
                prop_assert!(!e.to_string().is_empty());
                prop_assert_eq!(e.fault(), Fault::Limit);
                return Ok(());
            }
            Ok(a) => {
                prop_assert!(total <= limit);
                a
            }
        };
        // The model: bytes accepted so far.
        let mut accepted: Vec<u8> = Vec::new();
        for (at, data) in &chunks {
            let bytes: Vec<u8> = match data {
                Data::Payload(len) => {
                    let start = accepted.len().min(payload.len());
                    payload[start..(start + len).min(payload.len())].to_vec()
                }
                Data::Garbage(b) => b.clone(),
            };
            let received = accepted.len() as u64;
            prop_assert_eq!(asm.received(), received);
            let (offset, got) = match at {
                At::Next => (received, asm.push_next(&bytes)),
                At::Offset(o) => (*o, asm.push(*o, &bytes)),
            };
            let refusal = expected_refusal(received, total, chunk_limit, offset, bytes.len());
            let sink_fails = refusal.is_none() && accepted.len() + bytes.len() > sink_cap;
            match got {
                Ok(()) => {
                    prop_assert!(refusal.is_none() && !sink_fails);
                    accepted.extend_from_slice(&bytes);
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    if sink_fails {
                        prop_assert!(matches!(e, TransferError::Sink(_)), "{:?}", e);
                    } else {
                        prop_assert_eq!(Some(&e), refusal.as_ref());
                    }
                    let fault = e.fault();
                    if matches!(e, TransferError::ChunkTooLarge { .. }) {
                        prop_assert_eq!(fault, Fault::Limit);
                    } else if matches!(e, TransferError::Sink(_)) {
                        prop_assert_eq!(fault, Fault::Receiver);
                    } else {
                        prop_assert_eq!(fault, Fault::Sender);
                    }
                }
            }
            // Refused or not, the sink holds exactly the accepted bytes.
            prop_assert_eq!(asm.received(), accepted.len() as u64);
            prop_assert_eq!(&*sink.bytes.borrow(), &accepted);
        }
        let should_pass =
            accepted.len() as u64 == total && sha256_hex(&accepted) == expected_sha.to_ascii_lowercase();
        match asm.finish() {
            Ok(out) => {
                prop_assert!(should_pass);
                prop_assert_eq!(&*out.bytes.borrow(), &accepted);
            }
            Err(e) => {
                prop_assert!(!should_pass);
                prop_assert!(!e.to_string().is_empty());
                if accepted.len() as u64 != total {
                    prop_assert_eq!(
                        e,
                        TransferError::Truncated { got: accepted.len() as u64, total }
                    );
                } else {
                    prop_assert!(matches!(e, TransferError::HashMismatch { .. }), "{:?}", e);
                }
            }
        }
    }

    /// Chunks made by [`model_chunks`] from any payload, chunk size and resume offset
    /// reassemble to the payload (after the skipped prefix is pushed by hand), each chunk
    /// within the chunk size and starting where the previous ended; flipping any one bit of
    /// any chunk is caught by the hash, and a wrong total or a missing last chunk is refused.
    #[test]
    fn model_chunks_reassemble_and_any_corruption_is_refused(
        payload in vec(any::<u8>(), 0..3000),
        chunk_bytes in 1usize..1200,
        resume in any::<prop::sample::Index>(),
        flip in any::<(prop::sample::Index, prop::sample::Index, u8)>(),
    ) {
        let payload = Bytes::from(payload);
        let sha = sha256_hex(&payload);
        let offset = resume.index(payload.len() + 1);
        let chunks = model_chunks("run", 7, &sha, &payload, offset as u64, chunk_bytes);
        prop_assert!(!chunks.is_empty());
        let receive = |chunks: &[ModelChunk], total: u64| -> Result<Vec<u8>, TransferError> {
            let mut a = Assembler::new(Vec::new(), &sha, total, u64::MAX, chunk_bytes)?;
            // The prefix a resumed download skips arrived earlier, in chunks of its own.
            let mut at = 0;
            while at < offset {
                let end = (at + chunk_bytes).min(offset);
                a.push(at as u64, &payload[at..end])?;
                at = end;
            }
            for c in chunks {
                a.push(c.offset, &c.data)?;
            }
            a.finish()
        };
        let mut next = offset as u64;
        for c in &chunks {
            prop_assert!(c.data.len() <= chunk_bytes);
            prop_assert_eq!(c.offset, next);
            prop_assert_eq!(c.total_bytes, payload.len() as u64);
            prop_assert_eq!(&c.sha256, &sha);
            next += c.data.len() as u64;
        }
        prop_assert_eq!(next, payload.len() as u64);
        prop_assert_eq!(receive(&chunks, payload.len() as u64)?, payload.to_vec());

        // One flipped bit in one non-empty chunk.
        let non_empty: Vec<usize> = (0..chunks.len()).filter(|&i| !chunks[i].data.is_empty()).collect();
        if !non_empty.is_empty() {
            let (which, at, bit) = flip;
            let i = non_empty[which.index(non_empty.len())];
            let mut corrupt = chunks.clone();
            let mut bytes = corrupt[i].data.to_vec();
            let j = at.index(bytes.len());
            bytes[j] ^= 1 << (bit % 8);
            corrupt[i].data = Bytes::from(bytes);
            let got = receive(&corrupt, payload.len() as u64);
            prop_assert!(matches!(got, Err(TransferError::HashMismatch { .. })), "{:?}", got);
            // Without its last chunk the transfer is truncated.
            let last = chunks.len() - 1;
            if !chunks[last].data.is_empty() {
                let got = receive(&chunks[..last], payload.len() as u64);
                prop_assert!(matches!(got, Err(TransferError::Truncated { .. })), "{:?}", got);
            }
        }
        // A total one byte short makes the last byte overrun it.
        if !payload.is_empty() {
            let got = receive(&chunks, payload.len() as u64 - 1);
            prop_assert!(matches!(got, Err(TransferError::Overrun { .. })), "{:?}", got);
        }
    }
}

// --- receive_update_into on arbitrary message streams ---

/// One message of an upload stream.
#[derive(Clone, Debug)]
enum Msg {
    /// A header announcing `total` bytes hashing to the given hash.
    Header { total: u64, hash: Hash },
    /// A data chunk.
    Data(Vec<u8>),
    /// A message with no part set.
    Empty,
}

/// Bytes 0..=127 only, so that every encoded message stays valid UTF-8 (see [`body`]).
fn ascii(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    vec(0u8..0x80, len)
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        1 => (0u64..100, hash()).prop_map(|(total, hash)| Msg::Header { total, hash }),
        4 => ascii(0..40).prop_map(Msg::Data),
        1 => Just(Msg::Empty),
    ]
}

/// A gRPC request body holding `messages`, framed as on the wire (flag byte, big-endian
/// length, protobuf message).
///
/// `http_body::Body` is implemented for `String`, which avoids a dependency on an HTTP body
/// crate; the strategies keep every byte below 0x80 (ASCII data and hashes, lengths and
/// integers below 128), so the frames are valid UTF-8.
fn body(messages: &[UpdateChunk]) -> String {
    let mut out = Vec::new();
    for m in messages {
        let encoded = m.encode_to_vec();
        out.push(0);
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
    }
    String::from_utf8(out).expect("the strategies only produce ASCII frames")
}

/// Runs [`receive_update_into`] over `messages` in memory.
fn receive_messages(
    messages: &[UpdateChunk],
    limit: u64,
    chunk_limit: usize,
) -> Result<(UpdateHeader, Vec<u8>), ReceiveError> {
    let mut stream = tonic::Streaming::new_request(
        tonic_prost::ProstDecoder::<UpdateChunk>::default(),
        body(messages),
        None,
        None,
    );
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(receive_update_into(
            &mut stream,
            Vec::new(),
            limit,
            chunk_limit,
        ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// On arbitrary upload streams (headers anywhere or missing, repeated headers, empty
    /// messages, data of any size, any announced total and hash, any limits)
    /// `receive_update_into` never panics and succeeds exactly when the stream is one header
    /// then data chunks that fit the limits, run to the announced total and hash to the
    /// announced value; then it returns that header and exactly the data. Every refusal has a
    /// non-empty message and the status code of its cause.
    #[test]
    fn receive_update_accepts_only_a_well_formed_stream(
        payload in ascii(0..100),
        messages in vec(msg(), 0..8),
        well_formed in any::<bool>(),
        limit in prop_oneof![3 => Just(1u64 << 20), 1 => 0u64..100],
        chunk_limit in prop_oneof![3 => Just(1usize << 20), 1 => 0usize..40],
    ) {
        let right = sha256_hex(&payload);
        let hash_of = |h: &Hash| match h {
            Hash::Right => right.clone(),
            Hash::Upper => right.to_ascii_uppercase(),
            Hash::Other(s) => s.clone(),
        };
        // Half the cases: a real upload (a header and the payload in chunks), so the success
        // path is well covered; the other half: the arbitrary messages as they are.
        let messages: Vec<Msg> = if well_formed {
            let mut m = vec![Msg::Header { total: payload.len() as u64, hash: Hash::Right }];
            m.extend(payload.chunks(17).map(|c| Msg::Data(c.to_vec())));
            m
        } else {
            messages
        };
        let wire: Vec<UpdateChunk> = messages
            .iter()
            .map(|m| UpdateChunk {
                part: match m {
                    Msg::Header { total, hash } => Some(update_chunk::Part::Header(UpdateHeader {
                        round: 3,
                        delta_sha256: hash_of(hash),
                        total_bytes: *total,
                        ..Default::default()
                    })),
                    Msg::Data(d) => Some(update_chunk::Part::Data(Bytes::from(d.clone()))),
                    Msg::Empty => None,
                },
            })
            .collect();

        // The model of what must happen.
        let expected: Result<(u64, String, Vec<u8>), Fault> = (|| {
            let Some(Msg::Header { total, hash }) = messages.first() else {
                return Err(Fault::Sender);
            };
            if *total > limit {
                return Err(Fault::Limit);
            }
            let mut got = Vec::new();
            for m in &messages[1..] {
                let Msg::Data(d) = m else { return Err(Fault::Sender) };
                if d.len() > chunk_limit {
                    return Err(Fault::Limit);
                }
                if (got.len() + d.len()) as u64 > *total {
                    return Err(Fault::Sender);
                }
                got.extend_from_slice(d);
            }
            let sha = hash_of(hash);
            if got.len() as u64 != *total || sha256_hex(&got) != sha.to_ascii_lowercase() {
                return Err(Fault::Sender);
            }
            Ok((*total, sha, got))
        })();

        match (receive_messages(&wire, limit, chunk_limit), expected) {
            (Ok((header, bytes)), Ok((total, sha, data))) => {
                prop_assert_eq!(header.total_bytes, total);
                prop_assert_eq!(header.delta_sha256, sha);
                prop_assert_eq!(header.round, 3);
                prop_assert_eq!(bytes, data);
            }
            (Err(ReceiveError::Refused(e)), Err(fault)) => {
                prop_assert_eq!(e.fault(), fault, "{}", e);
                prop_assert!(!e.to_string().is_empty());
            }
            (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got.map(|(_, b)| b), want),
        }
    }
}
