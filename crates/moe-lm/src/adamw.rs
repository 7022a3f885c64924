//! AdamW with its state in plain tensors, so that it can be checkpointed
//! (tch's `nn::Optimizer` keeps its state inside libtorch, out of reach).

use crate::tensor_file::{read_tensors, write_tensors};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// AdamW's hyper-parameters; `Default` is PyTorch's `torch.optim.AdamW`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter and its moment estimates.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Steps this parameter took (PyTorch keeps one count per parameter).
    steps: i64,
}

/// AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) exactly as
/// PyTorch's `torch.optim.AdamW` (non-amsgrad) computes it, for step `t`
/// and gradient `g`:
///
/// ```text
/// p   <- p * (1 - lr * wd)                       (decoupled weight decay)
/// m   <- b1 * m + (1 - b1) * g
/// v   <- b2 * v + (1 - b2) * g^2
/// p   <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
///
/// A parameter without a gradient is skipped, as in PyTorch.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
}

impl AdamW {
    /// Over every trainable variable of `vs`, in name order.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> Result<Self> {
        if !(config.lr > 0.0 && config.lr.is_finite()) {
            return Err(MoeError::config(format!(
                "learning rate must be a positive number, got {}",
                config.lr
            )));
        }
        let in_unit = |b: f64| (0.0..1.0).contains(&b);
        if !in_unit(config.beta1) || !in_unit(config.beta2) || config.eps <= 0.0 {
            return Err(MoeError::config(format!(
                "AdamW needs 0 <= beta1, beta2 < 1 and eps > 0, got {}, {}, {}",
                config.beta1, config.beta2, config.eps
            )));
        }
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, param)| Slot {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
                steps: 0,
            })
            .collect();
        Ok(AdamW { config, slots })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Zeroes every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) {
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                slot.steps += 1;
                let t = slot.steps as f64;
                let step_size = lr / (1.0 - beta1.powf(t));
                let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
                // In-place passes only, with two temporaries: the update is
                // memory-bound (a makeMoE step spent 20% of its CPU time here).
                let _ = slot.param.g_mul_scalar_(1.0 - lr * weight_decay);
                let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = slot.exp_avg_sq.lerp_(&grad.square(), 1.0 - beta2);
                // denom = -(sqrt(v_hat) + eps) / step_size, so that
                // param += m / denom is param -= step_size * m / (sqrt(v_hat) + eps).
                let mut denom = slot.exp_avg_sq.sqrt();
                let _ = denom
                    .g_mul_scalar_(-1.0 / (step_size * bias_correction2_sqrt))
                    .g_add_scalar_(-eps / step_size);
                let _ = slot.param.addcdiv_(&slot.exp_avg, &denom);
            }
        });
    }

    /// Steps taken (by the first parameter; all take the same number when
    /// every parameter gets a gradient at every step).
    pub fn steps(&self) -> i64 {
        self.slots.first().map_or(0, |s| s.steps)
    }

    /// Writes the state (`exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME`)
    /// to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, Tensor)> = self
            .slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()),
                    (
                        format!("exp_avg_sq.{}", s.name),
                        s.exp_avg_sq.shallow_clone(),
                    ),
                    (format!("step.{}", s.name), Tensor::from_slice(&[s.steps])),
                ]
            })
            .collect();
        write_tensors(path, &named)
    }

    /// Reads the state written by [`AdamW::save`]; all or nothing: a file
    /// that does not match these parameters changes nothing.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state = self.read_state(path)?;
        self.apply_state(state);
        Ok(())
    }

    /// Reads and checks a state file without applying it.
    pub(crate) fn read_state(&self, path: &Path) -> Result<AdamWState> {
        let expected: Vec<(String, Vec<i64>)> = self
            .slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("exp_avg.{}", s.name), s.param.size()),
                    (format!("exp_avg_sq.{}", s.name), s.param.size()),
                    (format!("step.{}", s.name), vec![1]),
                ]
            })
            .collect();
        let mut tensors = read_tensors(path, "optimizer state", &expected)?;
        let mut take = |key: String| tensors.remove(&key).expect("checked by read_tensors");
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let m = take(format!("exp_avg.{}", s.name));
                let v = take(format!("exp_avg_sq.{}", s.name));
                let step = take(format!("step.{}", s.name));
                (m, v, step.to_kind(Kind::Int64).int64_value(&[0]))
            })
            .collect();
        Ok(AdamWState { slots })
    }

    /// Applies a state read by [`AdamW::read_state`].
    pub(crate) fn apply_state(&mut self, state: AdamWState) {
        tch::no_grad(|| {
            for (slot, (m, v, steps)) in self.slots.iter_mut().zip(state.slots) {
                slot.exp_avg.copy_(&m.to_kind(slot.exp_avg.kind()));
                slot.exp_avg_sq.copy_(&v.to_kind(slot.exp_avg_sq.kind()));
                slot.steps = steps;
            }
        });
    }
}

/// A checked optimizer state, ready to apply.
pub(crate) struct AdamWState {
    slots: Vec<(Tensor, Tensor, i64)>,
}

impl AdamWState {
    /// The step count of the first parameter.
    pub(crate) fn steps(&self) -> i64 {
        self.slots.first().map_or(0, |s| s.2)
    }
}
