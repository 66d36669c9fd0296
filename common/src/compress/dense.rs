//! Writing a decoded update out as a plain f32 safetensors file ([`DenseWriter`]), for
//! rules that keep every update on disk (the robust accumulator).

use std::fs::File;
use std::io::Write;

use super::Positions;
use crate::params::ParamSpec;

/// Writes a decoded update as the plain f32 safetensors file of a spec, from the runs
/// [`compress::visit`] hands out (in order), with zeros wherever no value came.
pub(crate) struct DenseWriter {
    w: std::io::BufWriter<File>,
    /// Values per tensor, in the spec's order (which is also the file's: all are f32).
    sizes: Vec<usize>,
    /// The tensor being written and how many of its values are.
    tensor: usize,
    at: usize,
}

impl DenseWriter {
    /// Starts the file: the header of `spec` (f32 tensors only).
    pub(crate) fn new(spec: &ParamSpec, mut w: std::io::BufWriter<File>) -> std::io::Result<Self> {
        /// A tensor's shape and size, with no data.
        struct Shape(Vec<usize>);
        impl safetensors::View for &Shape {
            fn dtype(&self) -> safetensors::Dtype {
                safetensors::Dtype::F32
            }
            fn shape(&self) -> &[usize] {
                &self.0
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                std::borrow::Cow::Borrowed(&[])
            }
            fn data_len(&self) -> usize {
                self.0.iter().product::<usize>() * 4
            }
        }
        let shapes: Vec<(&str, Shape)> = spec
            .iter()
            .map(|(name, t)| (name, Shape(t.shape.clone())))
            .collect();
        let header = safetensors::tensor::serialize(shapes.iter().map(|(n, s)| (*n, s)), None)
            .map_err(std::io::Error::other)?;
        w.write_all(&header)?;
        Ok(DenseWriter {
            w,
            sizes: spec.iter().map(|(_, t)| t.elem_count()).collect(),
            tensor: 0,
            at: 0,
        })
    }

    /// Writes zeros up to value `i` of tensor `t`.
    fn zeros_to(&mut self, t: usize, i: usize) -> std::io::Result<()> {
        while self.tensor < t {
            let end = self.sizes[self.tensor];
            self.zeros(end - self.at)?;
            self.tensor += 1;
            self.at = 0;
        }
        self.zeros(i - self.at)?;
        self.at = i;
        Ok(())
    }

    fn zeros(&mut self, n: usize) -> std::io::Result<()> {
        for _ in 0..n {
            self.w.write_all(&0f32.to_le_bytes())?;
        }
        Ok(())
    }

    fn value(&mut self, x: f64) -> std::io::Result<()> {
        // Decoded values are f32s widened: exact.
        self.w.write_all(&(x as f32).to_le_bytes())?;
        self.at += 1;
        Ok(())
    }

    /// Writes one visited run of tensor `t`.
    pub(crate) fn put(&mut self, t: usize, pos: Positions<'_>, xs: &[f64]) -> std::io::Result<()> {
        match pos {
            Positions::From(start) => {
                self.zeros_to(t, start)?;
                for &x in xs {
                    self.value(x)?;
                }
            }
            Positions::At(indices) => {
                for (&i, &x) in indices.iter().zip(xs) {
                    self.zeros_to(t, i as usize)?;
                    self.value(x)?;
                }
            }
        }
        Ok(())
    }

    /// Pads the last tensors and returns the file, flushed.
    pub(crate) fn finish(mut self) -> std::io::Result<File> {
        let last = self.sizes.len();
        if last > 0 {
            self.zeros_to(last - 1, self.sizes[last - 1])?;
        }
        self.w.into_inner().map_err(|e| e.into_error())
    }
}
