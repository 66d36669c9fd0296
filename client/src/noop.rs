//! The no-op trainer: a site that answers training tasks without training, so that the
//! coordinator's own cost (transfers, validation, aggregation, commits) can be measured apart
//! from local training.
//!
//! A [`NoopTrainer`] needs no data and no vocabulary. It keeps only the downloaded model's
//! safetensors header (the whole model is still hashed and checked against the task's
//! SHA-256 on the way, see [`ModelBuffer::header_only`]) and answers with a small,
//! deterministic delta of the same names, shapes and dtypes ([`noop_delta`]) and a fixed
//! example count. The delta depends only on the model's structure, so one serialised copy
//! per global model is shared by every site of a process: a thousand no-op sites in one
//! benchmark process cost one delta's memory, not a thousand.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use fedflow_common::compress::Compression;
use fedflow_common::params::{ParamSet, ParamSpec, SafetensorsLayout};
use prost::bytes::Bytes;

use crate::site::{SiteMetrics, TaskSpec, sha256_hex};
use crate::work::{ModelBuffer, SiteWork, Update};
use crate::{Error, Result};

/// Largest magnitude of a no-op delta value.
pub const NOOP_DELTA_SCALE: f32 = 1e-4;

/// The no-op delta for models shaped like `spec`: value `i` of every tensor (row-major) is
/// `NOOP_DELTA_SCALE · ((i mod 13) − 6) / 6`, in the tensor's dtype. Deterministic, finite,
/// small, and never all zero for tensors of two or more values.
pub fn noop_delta(spec: &ParamSpec) -> Result<ParamSet> {
    let mut tensors = BTreeMap::new();
    for (name, t) in spec.iter() {
        let values: Vec<f32> = (0..t.elem_count())
            .map(|i| NOOP_DELTA_SCALE * ((i % 13) as f32 - 6.0) / 6.0)
            .collect();
        let tensor = Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)
            .and_then(|x| {
                if t.dtype == DType::F32 {
                    Ok(x)
                } else {
                    x.to_dtype(t.dtype)
                }
            })
            .map_err(fedflow_common::Error::from)?;
        tensors.insert(name.to_string(), tensor);
    }
    Ok(ParamSet::from_tensors(tensors)?)
}

/// A site that returns [`noop_delta`] for every training task, weighted by a fixed example
/// count, without data, training or a vocabulary check.
#[derive(Debug)]
pub struct NoopTrainer {
    examples: usize,
    /// The last delta made: (model SHA-256 and compression, delta bytes, delta SHA-256).
    cache: Mutex<Option<(String, Bytes, String)>>,
}

impl NoopTrainer {
    /// A no-op site reporting `examples` training examples per task (its FedAvg weight).
    pub fn new(examples: usize) -> Self {
        NoopTrainer {
            examples,
            cache: Mutex::new(None),
        }
    }

    /// The delta for the model whose safetensors header is `header` (the length prefix and
    /// JSON header, as kept by [`ModelBuffer::header_only`]) and whose hash is
    /// `model_sha256`: its serialised bytes (compressed as `compression` says) and their
    /// SHA-256. Computed once per model and shared by every caller.
    pub fn delta_for(
        &self,
        model_sha256: &str,
        header: &[u8],
        compression: &Compression,
    ) -> Result<(Bytes, String)> {
        let key = format!("{model_sha256} {}", compression.name());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, bytes, delta_sha)) = cache.as_ref()
            && *k == key
        {
            return Ok((bytes.clone(), delta_sha.clone()));
        }
        let layout = SafetensorsLayout::read(&mut &header[..])?;
        let delta = noop_delta(&layout.spec)?;
        let bytes = if compression.is_none() {
            delta.to_safetensors_bytes()?
        } else {
            fedflow_common::compress::encode(&delta, compression, None)?.bytes
        };
        let bytes = Bytes::from(bytes);
        drop(delta);
        let delta_sha = sha256_hex(&bytes);
        *cache = Some((key, bytes.clone(), delta_sha.clone()));
        Ok((bytes, delta_sha))
    }
}

impl SiteWork for NoopTrainer {
    fn vocab_sha256(&self) -> &str {
        ""
    }

    fn model_buffer(&self) -> ModelBuffer {
        ModelBuffer::header_only()
    }

    fn train(
        &self,
        task: &TaskSpec,
        model: ModelBuffer,
        _on_epoch: &mut dyn FnMut(&fedflow_common::train::EpochReport),
    ) -> Result<Update> {
        if task.site_dp.is_some() {
            return Err(Error::Task(
                "the no-op trainer (an overhead benchmark tool) does not clip or noise its \
                 delta, so it cannot take part in a run with site-level DP"
                    .into(),
            ));
        }
        let (bytes, sha256) = self.delta_for(
            &task.expected_model_sha256,
            model.bytes(),
            &task.compression,
        )?;
        if bytes.is_empty() {
            return Err(Error::Task("the global model has no tensors".into()));
        }
        Ok(Update {
            bytes,
            sha256,
            metrics: SiteMetrics::counts_only(self.examples, 0),
            unclipped: true,
        })
    }

    /// Reports that nothing was measured: a no-op site has no validation data.
    fn evaluate(&self, _task: &TaskSpec, _model: ModelBuffer) -> Result<SiteMetrics> {
        Ok(SiteMetrics::counts_only(self.examples, 0))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn model() -> ParamSet {
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &Device::Cpu).unwrap();
        ParamSet::from_tensors(BTreeMap::from([
            ("a.w".to_string(), t(&[1.0; 30], &[5, 6])),
            ("b".to_string(), t(&[0.5, 0.25], &[2])),
        ]))
        .unwrap()
    }

    #[test]
    fn the_delta_matches_the_model_from_its_header_alone() {
        let global = model();
        let bytes = global.to_safetensors_bytes().unwrap();
        let mut buffer = ModelBuffer::header_only();
        // Written in odd pieces, as chunks arrive.
        for piece in bytes.chunks(7) {
            buffer.write_all(piece).unwrap();
        }
        assert!(buffer.bytes().len() < bytes.len());
        let noop = NoopTrainer::new(42);
        let spec = TaskSpec {
            run_id: "r".into(),
            task_id: "t".into(),
            record_dp: None,
            site_dp: None,
            compression: Default::default(),
            round: 1,
            model: fedflow_common::model::ModelConfig::default(),
            vocab_sha256: String::new(),
            expected_model_sha256: sha256_hex(&bytes),
            train: Default::default(),
        };
        let update = noop.train(&spec, buffer, &mut |_| {}).unwrap();
        assert_eq!(update.metrics.train_examples, 42);
        assert_eq!(update.sha256, sha256_hex(&update.bytes));
        let delta = ParamSet::from_safetensors_bytes(&update.bytes).unwrap();
        delta.validate_against(&global.spec()).unwrap();
        let b = delta.get("b").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(b, vec![-NOOP_DELTA_SCALE, -NOOP_DELTA_SCALE * 5.0 / 6.0]);
        assert!(delta.l2_norm().unwrap() > 0.0);

        // The same model gives the same (shared) bytes.
        let again = noop
            .delta_for(&spec.expected_model_sha256, &bytes[..], &Compression::NONE)
            .unwrap();
        assert_eq!(again.0.as_ptr(), update.bytes.as_ptr());
    }
}
