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
            let mut g = g.clone();
            if self.weight_decay != 0.0 {
                g = (g + (var.as_tensor() * self.weight_decay)?)?;
            }
            if self.momentum != 0.0 {
                let v = match velocity.take() {
                    Some(v) => ((v * self.momentum)? + &g)?,
                    None => g,
                };
                g = v.clone();
                *velocity = Some(v);
            }
            var.set(&(var.as_tensor() - (g * self.lr)?)?)?;
        }
        Ok(())
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
