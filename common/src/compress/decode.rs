//! Reading a compressed update back: [`visit`] streams its decoded values block by block
//! (what the coordinator's accumulators fold in), [`decode_bytes`] builds the whole decoded
//! update in memory (what a site keeps for error feedback and tests compare against).

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{Device, Tensor};
use half::{bf16, f16};

use super::{Compression, Part, ValueCodec, part, read_layout};
use crate::error::{Error, Result};
use crate::params::{ParamSet, ParamSpec, SafetensorsLayout};

/// Values read from the file at a time (per part).
const CHUNK: usize = 16 * 1024;

/// Values handed to the visitor at a time.
const RUN: usize = 256;

/// Where the values of one visited run go within their tensor.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Consecutive coordinates starting at this one.
    From(usize),
    /// These coordinates (top-k's, strictly increasing), one per value.
    At(&'a [u32]),
}

/// Streams the decoded values of the compressed update in `r`, whose layout `layout` has
/// passed [`read_layout`] for `spec` and `compression`, calling `f(tensor, positions,
/// values)` with the index of the tensor in `spec`'s (name) order, where the values go, and
/// up to 256 decoded values (f32, widened; see the module docs). Tensors come in `spec`'s
/// order and positions in increasing order within each, so summing the squares of the
/// values in the order given is exactly [`ParamSet::l2_norm`] of the decoded update.
///
/// Validates while reading, so a first pass finds every problem before a second one uses
/// the values: top-k's indices must be strictly increasing and below the tensor's size
/// ([`Error::ParamMismatch`]), float values and int8 scales finite ([`Error::NonFinite`],
/// after the visitor has seen the tensor). `what` names the update in I/O errors.
/// Reads each part in blocks of 16 Ki values: memory is a few hundred KiB, plus one
/// tensor's int8 scales (a 256th of its values).
pub fn visit<R: Read + Seek>(
    r: &mut R,
    what: &Path,
    layout: &SafetensorsLayout,
    spec: &ParamSpec,
    compression: &Compression,
    mut f: impl FnMut(usize, Positions<'_>, &[f64]),
) -> Result<()> {
    let mut raw = vec![0u8; CHUNK * 4];
    let mut index_raw = vec![0u8; CHUNK * 4];
    let mut indices = vec![0u32; CHUNK];
    let mut values = vec![0f64; CHUNK];
    for (t, (name, ts)) in spec.iter().enumerate() {
        let n = ts.elem_count();
        let k = compression.kept(n);
        let value_name = match (compression.values, compression.top_k) {
            (ValueCodec::Int8, _) => part(name, Part::Codes),
            (_, Some(_)) => part(name, Part::Value),
            _ => name.to_string(),
        };
        let scales = match compression.values {
            ValueCodec::Int8 => {
                let scale_name = part(name, Part::Scale);
                let range = layout.ranges[&scale_name].clone();
                let mut bytes = vec![0u8; (range.end - range.start) as usize];
                read_at(r, what, range.start, &mut bytes)?;
                let scales: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let bad = scales.iter().filter(|s| !s.is_finite()).count();
                if bad > 0 {
                    return Err(Error::NonFinite {
                        name: scale_name,
                        count: bad,
                    });
                }
                scales
            }
            _ => Vec::new(),
        };
        let value_start = layout.ranges[&value_name].start;
        let size = value_size(compression.values);
        let index_start = compression
            .top_k
            .map(|_| layout.ranges[&part(name, Part::Index)].start);
        let mut previous: Option<u32> = None;
        let mut non_finite = 0usize;
        let mut at = 0usize;
        while at < k {
            let len = CHUNK.min(k - at);
            let bytes = &mut raw[..len * size];
            read_at(r, what, value_start + (at * size) as u64, bytes)?;
            non_finite += decode_values(
                compression.values,
                bytes,
                &scales,
                compression.block_size,
                at,
                &mut values[..len],
            );
            match index_start {
                None => {
                    for (j, run) in values[..len].chunks(RUN).enumerate() {
                        f(t, Positions::From(at + j * RUN), run);
                    }
                }
                Some(start) => {
                    let ib = &mut index_raw[..len * 4];
                    read_at(r, what, start + (at * 4) as u64, ib)?;
                    for (i, b) in indices[..len].iter_mut().zip(ib.chunks_exact(4)) {
                        *i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    for (j, &i) in indices[..len].iter().enumerate() {
                        if i as usize >= n || previous.is_some_and(|p| i <= p) {
                            return Err(Error::ParamMismatch(format!(
                                "tensor `{}`: index {i} at position {} is {} (indices must \
                                 increase strictly and stay below {n})",
                                part(name, Part::Index),
                                at + j,
                                if i as usize >= n {
                                    "out of range"
                                } else {
                                    "not above the one before"
                                }
                            )));
                        }
                        previous = Some(i);
                    }
                    for (run, pos) in values[..len].chunks(RUN).zip(indices[..len].chunks(RUN)) {
                        f(t, Positions::At(pos), run);
                    }
                }
            }
            at += len;
        }
        if non_finite > 0 {
            return Err(Error::NonFinite {
                name: value_name,
                count: non_finite,
            });
        }
    }
    Ok(())
}

/// The decoded update of the compressed update `bytes` for a model shaped like `spec`: f32
/// tensors of `spec`'s shapes, 0 where top-k sent nothing. Same checks as [`visit`], plus
/// [`read_layout`]'s.
pub fn decode_bytes(bytes: &[u8], spec: &ParamSpec, compression: &Compression) -> Result<ParamSet> {
    let what = Path::new("<compressed update>");
    let mut r = Cursor::new(bytes);
    let layout = read_layout(
        &mut r,
        bytes.len() as u64,
        "the compressed update",
        spec,
        compression,
    )?;
    let mut out: Vec<Vec<f32>> = spec
        .iter()
        .map(|(_, t)| vec![0f32; t.elem_count()])
        .collect();
    visit(&mut r, what, &layout, spec, compression, |t, pos, xs| {
        scatter(&mut out[t], pos, xs, |slot, x| *slot = x as f32);
    })?;
    let mut tensors = BTreeMap::new();
    for ((name, t), values) in spec.iter().zip(out) {
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?,
        );
    }
    ParamSet::from_tensors(tensors)
}

/// Applies `op(slot, value)` to the slots of `target` a visited run goes to.
pub(crate) fn scatter<T>(
    target: &mut [T],
    positions: Positions<'_>,
    values: &[f64],
    mut op: impl FnMut(&mut T, f64),
) {
    match positions {
        Positions::From(start) => {
            for (slot, &x) in target[start..].iter_mut().zip(values) {
                op(slot, x);
            }
        }
        Positions::At(indices) => {
            for (&i, &x) in indices.iter().zip(values) {
                op(&mut target[i as usize], x);
            }
        }
    }
}

/// Bytes per stored value of a codec (int8 codes are one byte; their scales are apart).
fn value_size(v: ValueCodec) -> usize {
    match v {
        ValueCodec::F32 => 4,
        ValueCodec::F16 | ValueCodec::Bf16 => 2,
        ValueCodec::Int8 => 1,
    }
}

/// Decodes the stored values `raw` (the `first`-th value onwards) into `out`, returning how
/// many were not finite. int8 values use `scales[position / block]`.
fn decode_values(
    codec: ValueCodec,
    raw: &[u8],
    scales: &[f32],
    block: usize,
    first: usize,
    out: &mut [f64],
) -> usize {
    let mut bad = 0usize;
    match codec {
        ValueCodec::F32 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        ValueCodec::F16 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f64();
            }
        }
        ValueCodec::Bf16 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f64();
            }
        }
        ValueCodec::Int8 => {
            for (j, (o, &b)) in out.iter_mut().zip(raw).enumerate() {
                let scale = scales[(first + j) / block];
                *o = f64::from(scale * f32::from(b as i8));
            }
            // Scales were checked finite; a finite scale times |q| <= 128 can still overflow.
        }
    }
    for o in out.iter() {
        bad += usize::from(!o.is_finite());
    }
    bad
}

/// Reads exactly `buf.len()` bytes at `offset` of `r`.
fn read_at<R: Read + Seek>(r: &mut R, what: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    r.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(what, e))?;
    r.read_exact(buf).map_err(|e| Error::io(what, e))
}
