//! The safetensors codec of [`ParamSet`]: encoding (to bytes, or streamed tensor by tensor
//! into a writer or a file, hashed on the way), decoding (from bytes, or streamed from a file
//! and hashed in the same pass), and reading and checking a file's header alone
//! ([`SafetensorsLayout`]).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, WithDType};

use super::{ParamSet, ParamSpec, TensorSpec, with_slice};
use crate::error::{Error, Result};
use crate::hash::HashingWriter;

impl ParamSet {
    // --- Serialisation ---------------------------------------------------------------------

    /// Serialises to safetensors bytes, without metadata.
    ///
    /// Deterministic: the safetensors writer orders tensors by dtype, then name, and the
    /// header is written in that order, so equal parameter sets give equal bytes.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        safetensors::tensor::serialize(self.tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))
    }

    /// Writes exactly the bytes of [`ParamSet::to_safetensors_bytes`] to `w`, tensor by
    /// tensor, without building them in memory; returns how many bytes were written.
    ///
    /// The header comes from the `safetensors` crate itself (serialising zero-length views
    /// that report the real sizes), so names, order, offsets and padding are the crate's; the
    /// data of contiguous f32/f64 CPU tensors is then converted to little-endian bytes through
    /// a 64 KiB buffer, read in place. Other dtypes and non-contiguous tensors are copied
    /// once, one tensor at a time. `w` sees many small writes: give it a buffered writer.
    pub fn write_safetensors(&self, w: &mut impl std::io::Write) -> Result<u64> {
        let header = self.safetensors_header()?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header[8..])
            .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))?;
        let offsets = |name: &str| metadata.info(name).map_or((0, 0), |i| i.data_offsets);
        // The file's order (by descending dtype, then name) is the order of the offsets.
        let mut order: Vec<(&str, &Tensor)> = self.iter().collect();
        // (An empty tensor starts where the next one does: sort by the end too.)
        order.sort_by_key(|(name, _)| offsets(name));
        let io = |e: std::io::Error| Error::Safetensors(format!("cannot write parameters: {e}"));
        w.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let mut buf = Vec::with_capacity(WRITE_BLOCK);
        for (name, t) in order {
            written += match t.dtype() {
                DType::F32 => write_le(w, t, &mut buf, f32::to_le_bytes)?,
                DType::F64 => write_le(w, t, &mut buf, f64::to_le_bytes)?,
                _ => {
                    let bytes = safetensors::View::data(&t);
                    w.write_all(&bytes).map_err(io)?;
                    bytes.len() as u64
                }
            };
            debug_assert_eq!(
                written,
                (header.len() + offsets(name).1) as u64,
                "tensor `{name}` must end where the header says"
            );
        }
        Ok(written)
    }

    /// The 8-byte length prefix and the JSON header that [`ParamSet::to_safetensors_bytes`]
    /// starts with, made by the `safetensors` crate from views without data.
    fn safetensors_header(&self) -> Result<Vec<u8>> {
        /// A tensor's dtype, shape and size, with no data.
        struct Shape<'a>(&'a Tensor);
        impl safetensors::View for Shape<'_> {
            fn dtype(&self) -> safetensors::Dtype {
                safetensors::View::dtype(&self.0)
            }
            fn shape(&self) -> &[usize] {
                self.0.dims()
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                std::borrow::Cow::Borrowed(&[])
            }
            fn data_len(&self) -> usize {
                safetensors::View::data_len(&self.0)
            }
        }
        safetensors::tensor::serialize(
            self.tensors.iter().map(|(k, t)| (k.as_str(), Shape(t))),
            None,
        )
        .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))
    }

    /// Parses safetensors bytes (metadata, if any, is ignored). The values are restored
    /// bit for bit.
    ///
    /// Garbage, truncated or inconsistent input gives [`Error::Safetensors`], never a panic.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, "parameter bytes")
    }

    /// Writes safetensors bytes to `path` atomically: a temporary file in the same directory
    /// is written, flushed to disk and renamed over `path`, so readers see either the old file
    /// or the complete new one.
    ///
    /// The bytes are streamed tensor by tensor ([`ParamSet::write_safetensors`]), never held
    /// whole. Returns the file's size and lowercase hex SHA-256 (that of
    /// [`ParamSet::to_safetensors_bytes`]), computed while writing.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(u64, String)> {
        let path = path.as_ref();
        crate::fsio::write_atomic_with(path, |file| {
            let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(WRITE_BLOCK, file));
            self.write_safetensors(&mut w)?;
            let (_, sha256, size) = w.finish().map_err(|e| Error::io(path, e))?;
            Ok((size, sha256))
        })
    }

    /// Reads a safetensors file tensor by tensor, hashing it on the way, and returns the
    /// parameters with the file's size and lowercase hex SHA-256 (of every byte, trailing
    /// bytes included), so a caller can check the file against a recorded hash without
    /// holding its bytes and the parsed tensors at the same time: memory is the parameters
    /// plus a 64 KiB buffer (plus one tensor's bytes for dtypes other than f32/f64).
    ///
    /// The values are restored bit for bit, as by [`ParamSet::load`]. A malformed or
    /// truncated file gives [`Error::Safetensors`] or [`Error::Io`]; in particular a header
    /// describing more bytes than the file holds is refused before any tensor is allocated,
    /// so a small file cannot make the loader allocate what its header claims.
    pub fn load_hashed(path: impl AsRef<Path>) -> Result<(ParamSet, u64, String)> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let actual_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut r =
            crate::hash::HashingReader::new(std::io::BufReader::with_capacity(WRITE_BLOCK, file));
        let layout = SafetensorsLayout::read(&mut r)?;
        // Trailing bytes are allowed (and hashed), a data section shorter than the header's
        // claim is not.
        if layout.file_len > actual_len {
            return Err(Error::Safetensors(format!(
                "{} is {actual_len} bytes but its header describes {} bytes",
                path.display(),
                layout.file_len
            )));
        }
        let mut order: Vec<(&String, &std::ops::Range<u64>)> = layout.ranges.iter().collect();
        // (An empty tensor starts where the next one does: sort by the end too.)
        order.sort_by_key(|(_, range)| (range.start, range.end));
        let mut tensors = BTreeMap::new();
        for (name, range) in order {
            if range.start != r.bytes_read() {
                return Err(Error::Safetensors(format!(
                    "{}: tensor `{name}` does not start where the previous one ends",
                    path.display()
                )));
            }
            let spec = layout
                .spec
                .get(name)
                .expect("the layout's names are its spec's");
            let tensor = read_tensor(&mut r, spec, range.end - range.start)
                .map_err(|e| Error::io(path, e))?;
            tensors.insert(name.clone(), tensor);
        }
        std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
        let (sha256, size) = r.finish();
        Ok((Self::from_tensors(tensors)?, size, sha256))
    }

    /// Reads a file written by [`ParamSet::save`] (or any safetensors file).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, &path.display().to_string())
    }

    fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
            Error::Safetensors(format!(
                "{origin} ({} bytes) are not a valid safetensors file: {e}",
                bytes.len()
            ))
        })?;
        Self::from_tensors(tensors.into_iter().collect())
    }

    /// SHA-256 of [`ParamSet::to_safetensors_bytes`], as 64 lowercase hex digits.
    ///
    /// Hashed while serialising tensor by tensor, so the bytes are never held whole.
    pub fn sha256_hex(&self) -> Result<String> {
        let mut w = HashingWriter::new(std::io::sink());
        self.write_safetensors(&mut w)?;
        let (_, sha256, _) = w
            .finish()
            .map_err(|e| Error::Safetensors(format!("cannot hash parameters: {e}")))?;
        Ok(sha256)
    }
}

// ------------------------------------------------------------------------------------------------
// Safetensors headers
// ------------------------------------------------------------------------------------------------

/// The layout of a safetensors file, read from its header alone: where each tensor's bytes
/// are, so a large file can be processed tensor by tensor without loading it whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsLayout {
    /// Names, shapes and dtypes of the tensors in the file.
    pub spec: ParamSpec,
    /// Each tensor's byte range, absolute within the file, keyed by name.
    pub ranges: BTreeMap<String, std::ops::Range<u64>>,
    /// Size of the whole file: the 8-byte length prefix, the JSON header and the data.
    pub file_len: u64,
}

impl SafetensorsLayout {
    /// Reads the 8-byte length prefix and the JSON header from `r` (positioned at the start
    /// of the file) and checks them with the `safetensors` crate (offsets contiguous and
    /// consistent with shapes and dtypes). Leaves `r` just after the header. The tensor data
    /// is not read, so `file_len` is the header's claim; compare it with the real size.
    ///
    /// Garbage or inconsistent headers give [`Error::Safetensors`]; dtypes candle cannot hold
    /// give [`Error::ParamMismatch`].
    pub fn read(r: &mut impl std::io::Read) -> Result<Self> {
        let bad = |why: String| Error::Safetensors(format!("invalid safetensors header: {why}"));
        let mut prefix = [0u8; 8];
        r.read_exact(&mut prefix)
            .map_err(|e| bad(format!("cannot read the length prefix: {e}")))?;
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read the {n}-byte header: {e}")))?;
        // `Metadata`'s deserialiser sorts by offset and validates offsets against shapes and
        // dtypes (what `SafeTensors::read_metadata` does, minus its whole-buffer check).
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + n;
        let mut entries = BTreeMap::new();
        let mut ranges = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
                Error::ParamMismatch(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    info.dtype
                ))
            })?;
            let (start, end) = info.data_offsets;
            ranges.insert(
                name.clone(),
                data_start + start as u64..data_start + end as u64,
            );
            entries.insert(
                name,
                TensorSpec {
                    shape: info.shape.clone(),
                    dtype,
                },
            );
        }
        Ok(SafetensorsLayout {
            spec: ParamSpec::new(entries),
            ranges,
            file_len: data_start + metadata.data_len() as u64,
        })
    }
}

/// Largest safetensors JSON header accepted (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn dtype_from_safetensors(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// Bytes converted at a time by [`ParamSet::write_safetensors`].
const WRITE_BLOCK: usize = 64 * 1024;

/// Writes the values of `t` (of dtype `T`) to `w` as little-endian bytes through `buf`;
/// returns the number of bytes written.
fn write_le<T: WithDType, const N: usize>(
    w: &mut impl std::io::Write,
    t: &Tensor,
    buf: &mut Vec<u8>,
    to_le: fn(T) -> [u8; N],
) -> Result<u64> {
    with_slice::<T, _>(t, |xs| {
        for run in xs.chunks(WRITE_BLOCK / N) {
            buf.clear();
            for &x in run {
                buf.extend_from_slice(&to_le(x));
            }
            w.write_all(buf)?;
        }
        Ok((xs.len() * N) as u64)
    })?
    .map_err(|e: std::io::Error| Error::Safetensors(format!("cannot write parameters: {e}")))
}

/// Reads one tensor of `len` bytes shaped like `spec` from `r`: f32 and f64 values are
/// decoded block by block straight into the tensor's buffer; other dtypes are read whole and
/// then copied into a tensor.
fn read_tensor(r: &mut impl std::io::Read, spec: &TensorSpec, len: u64) -> std::io::Result<Tensor> {
    let bad = |e: candle_core::Error| std::io::Error::other(e.to_string());
    let shape = spec.shape.as_slice();
    match spec.dtype {
        DType::F32 => {
            Tensor::from_vec(read_le(r, len, f32::from_le_bytes)?, shape, &Device::Cpu).map_err(bad)
        }
        DType::F64 => {
            Tensor::from_vec(read_le(r, len, f64::from_le_bytes)?, shape, &Device::Cpu).map_err(bad)
        }
        dtype => {
            let mut bytes = vec![0u8; len as usize];
            r.read_exact(&mut bytes)?;
            Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).map_err(bad)
        }
    }
}

/// Reads `len` bytes of little-endian values from `r` through a 64 KiB buffer.
fn read_le<T, const N: usize>(
    r: &mut impl std::io::Read,
    len: u64,
    from_le: fn([u8; N]) -> T,
) -> std::io::Result<Vec<T>> {
    let count = (len / N as u64) as usize;
    let mut out = Vec::with_capacity(count);
    let mut buf = vec![0u8; WRITE_BLOCK];
    let mut left = count * N;
    while left > 0 {
        let block = &mut buf[..left.min(WRITE_BLOCK)];
        r.read_exact(block)?;
        left -= block.len();
        out.extend(
            block
                .chunks_exact(N)
                .map(|b| from_le(b.try_into().expect("chunks of N bytes"))),
        );
    }
    Ok(out)
}
