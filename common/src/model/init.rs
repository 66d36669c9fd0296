//! Seeded parameter creation.
//!
//! candle's CPU random number generator cannot be seeded, so fedflow draws initial values
//! from its own ChaCha8 stream (portable and reproducible) and registers them as `Var`s in
//! the model's `VarMap` under PyTorch-compatible names.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Creates named, seeded parameters in a [`VarMap`].
pub(crate) struct ParamBuilder<'a> {
    varmap: &'a VarMap,
    rng: ChaCha8Rng,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for ParamBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamBuilder")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl<'a> ParamBuilder<'a> {
    pub(crate) fn new(varmap: &'a VarMap, rng: ChaCha8Rng, device: Device, dtype: DType) -> Self {
        ParamBuilder {
            varmap,
            rng,
            device,
            dtype,
        }
    }

    fn register(
        &mut self,
        name: &str,
        values: Vec<f64>,
        shape: Shape,
    ) -> candle_core::Result<Tensor> {
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        let mut data = self.varmap.data().lock().expect("varmap lock poisoned");
        if data.insert(name.to_string(), var).is_some() {
            candle_core::bail!("parameter {name} registered twice");
        }
        Ok(tensor)
    }

    /// Uniform in `[-bound, bound]` (PyTorch's default for LSTM/GRU and linear layers).
    pub(crate) fn uniform(
        &mut self,
        name: &str,
        shape: impl Into<Shape>,
        bound: f64,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let values = (0..shape.elem_count())
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        self.register(name, values, shape)
    }

    /// Normal with mean 0 and the given standard deviation.
    pub(crate) fn normal(
        &mut self,
        name: &str,
        shape: impl Into<Shape>,
        std: f64,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let values = (0..shape.elem_count())
            .map(|_| {
                std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut self.rng)
            })
            .collect();
        self.register(name, values, shape)
    }

    /// All zeros.
    pub(crate) fn zeros(
        &mut self,
        name: &str,
        shape: impl Into<Shape>,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        self.register(name, vec![0.0; shape.elem_count()], shape)
    }

    /// All ones.
    pub(crate) fn ones(
        &mut self,
        name: &str,
        shape: impl Into<Shape>,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        self.register(name, vec![1.0; shape.elem_count()], shape)
    }
}
