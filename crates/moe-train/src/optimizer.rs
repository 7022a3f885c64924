//! The [`Optimizer`] trait the [`crate::Trainer`] drives, and gradient
//! clipping by global norm.

use crate::CONFIG_FILE;
use moe_core::{MoeError, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// An optimizer whose state can be checkpointed. [`crate::AdamW`] is the
/// one this crate provides.
pub trait Optimizer: std::fmt::Debug {
    /// Drops (or zeroes) every parameter's gradient before a backward pass.
    fn zero_grad(&mut self) -> Result<()>;

    /// One update of every parameter that has a gradient.
    fn step(&mut self) -> Result<()>;

    /// The learning rate of the next step.
    fn lr(&self) -> f64;

    /// Sets the learning rate of the next steps (a schedule calls it).
    fn set_lr(&mut self, lr: f64);

    /// Updates taken so far.
    fn steps(&self) -> i64;

    /// Writes the state to `path`.
    fn save(&self, path: &Path) -> Result<()>;

    /// Reads the state written by [`Optimizer::save`] into a checkpoint,
    /// checks that it took the `expected_steps` steps of its `config.json`, and applies it; on any error nothing changes.
    fn load_checked(&mut self, path: &Path, expected_steps: i64) -> Result<()>;
}

impl Optimizer for crate::AdamW {
    fn zero_grad(&mut self) -> Result<()> {
        crate::AdamW::zero_grad(self)
    }

    fn step(&mut self) -> Result<()> {
        crate::AdamW::step(self)
    }

    fn lr(&self) -> f64 {
        self.config().lr
    }

    fn set_lr(&mut self, lr: f64) {
        crate::AdamW::set_lr(self, lr)
    }

    fn steps(&self) -> i64 {
        crate::AdamW::steps(self)
    }

    fn save(&self, path: &Path) -> Result<()> {
        crate::AdamW::save(self, path)
    }

    fn load_checked(&mut self, path: &Path, expected_steps: i64) -> Result<()> {
        let state = self.read_state(path)?;
        if state.steps() != expected_steps {
            return Err(MoeError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "the optimizer state is from step {} but {CONFIG_FILE} says step \
                     {expected_steps} (an interrupted save?)",
                    state.steps()
                ),
            });
        }
        self.apply_state(state);
        Ok(())
    }
}

/// Scales the gradients of `params` so that their global L2 norm is at most
/// `max_norm` (PyTorch's `clip_grad_norm_`):
///
/// `n = sqrt(sum_p ||g_p||^2)`, `g_p <- g_p * min(1, max_norm / (n + 1e-6))`.
///
/// Returns `n` (before clipping) as a device scalar: nothing is read back
/// to the host. Parameters without a gradient are skipped.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    }
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).norm())
        .collect();
    let total = Tensor::stack(&norms, 0).norm();
    scale_to_norm(&grads, &total, max_norm);
    total
}

/// Scales `grads` by `min(1, max_norm / (total + 1e-6))` in place, PyTorch's
/// `clip_grad_norm_` once the global norm `total` is known.
pub(crate) fn scale_to_norm(grads: &[Tensor], total: &Tensor, max_norm: f64) {
    let coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| {
        for g in grads {
            let _ = g
                .shallow_clone()
                .g_mul_(&coef.to_device(g.device()).to_kind(g.kind()));
        }
    });
}
