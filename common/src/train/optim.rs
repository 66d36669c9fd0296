//! Optimisers: AdamW (candle's) and SGD with momentum (PyTorch semantics, written here
//! because candle's `SGD` has no momentum).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Which optimiser local training uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay), β = (0.9, 0.999), ε = 1e-8.
    #[default]
    Adamw,
    /// SGD with (heavy-ball) momentum and L2 weight decay, as `torch.optim.SGD`.
    Sgd,
}

impl std::str::FromStr for OptimizerKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(OptimizerKind::Adamw),
            "sgd" => Ok(OptimizerKind::Sgd),
            other => Err(crate::Error::Config(format!(
                "unknown optimizer `{other}`: expected adamw or sgd"
            ))),
        }
    }
}

/// SGD with momentum: `g ← ∇ + λθ; v ← μv + g; θ ← θ − η v` (PyTorch's `SGD`, dampening 0).
#[derive(Debug)]
pub(crate) struct SgdMomentum {
    vars: Vec<(Var, Option<Tensor>)>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl SgdMomentum {
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for (var, velocity) in &mut self.vars {
            let Some(g) = grads.get(var) else { continue };
            // Detached throughout: arithmetic on a `Var` is recorded by candle's autograd, and
            // a velocity that kept its graph would chain every past step (unbounded memory).
            let theta = var.as_tensor().detach();
            let mut g = g.detach();
            if self.weight_decay != 0.0 {
                g = (g + (&theta * self.weight_decay)?)?;
            }
            if self.momentum != 0.0 {
                let v = match velocity.take() {
                    Some(v) => ((v * self.momentum)? + &g)?,
                    None => g,
                };
                g = v.clone();
                *velocity = Some(v);
            }
            var.set(&(theta - (g * self.lr)?)?)?;
        }
        Ok(())
    }

    /// The velocities, for tests.
    #[cfg(test)]
    pub(crate) fn velocities(&self) -> impl Iterator<Item = &Tensor> {
        self.vars.iter().filter_map(|(_, v)| v.as_ref())
    }
}

/// A configured optimiser over a model's variables.
#[derive(Debug)]
pub(crate) enum Optimizer {
    Adamw(AdamW),
    Sgd(SgdMomentum),
}

impl Optimizer {
    pub(crate) fn new(
        kind: OptimizerKind,
        vars: Vec<Var>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Adamw => Optimizer::Adamw(AdamW::new(
                vars,
                ParamsAdamW {
                    lr,
                    weight_decay,
                    ..ParamsAdamW::default()
                },
            )?),
            OptimizerKind::Sgd => Optimizer::Sgd(SgdMomentum {
                vars: vars.into_iter().map(|v| (v, None)).collect(),
                lr,
                momentum,
                weight_decay,
            }),
        })
    }

    pub(crate) fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Adamw(o) => o.step(grads)?,
            Optimizer::Sgd(o) => o.step(grads)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    #[test]
    fn sgd_matches_torch_and_keeps_no_autograd_graph() {
        // torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.5) on loss = sum(w^2):
        // w = 1.0; step 1: g = 2 + 0.5 = 2.5, v = 2.5, w = 0.75
        //          step 2: g = 1.5 + 0.375 = 1.875, v = 2.25 + 1.875 = 4.125, w = 0.3375
        let var = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let mut opt = SgdMomentum {
            vars: vec![(var.clone(), None)],
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.5,
        };
        for _ in 0..2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let w = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((w - 0.3375).abs() < 1e-6, "{w}");
        for v in opt.velocities() {
            assert!(!v.track_op(), "velocity must not carry an autograd graph");
        }
        assert!(!var.as_tensor().detach().track_op());
    }
}
