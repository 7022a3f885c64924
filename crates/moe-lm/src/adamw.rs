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
///
/// When every parameter lives on one device with one dtype, [`AdamW::new`]
/// moves them (values unchanged) into one flat buffer and makes each a view
/// of it, as PyTorch's FSDP does with its flat parameters; the moments are
/// views of two more flat buffers. On a GPU a step then concatenates the
/// gradients once and updates the whole model with a handful of kernels
/// instead of a handful per parameter: 9 launches instead of about 900 for
/// the makeMoE model, whose GPU step is bound by launches. On a CPU the
/// update stays per parameter: each parameter's passes then run over a few
/// MiB that stay in cache, where passes over the whole 36 MiB buffers stream
/// from memory (measured on the makeMoE model with `train_bench --device cpu
/// --phases` while the flat update was the default on every device: 91 ms
/// per update flat, 26 ms per parameter).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    flat: Option<FlatState>,
    /// Update through `flat` (when it exists); by default on GPUs only.
    flat_update: bool,
}

/// The buffers that the slots' parameters and moments are views of.
#[derive(Debug)]
struct FlatState {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
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
        let uniform = vars
            .windows(2)
            .all(|w| (w[0].1.device(), w[0].1.kind()) == (w[1].1.device(), w[1].1.kind()));
        if uniform && !vars.is_empty() {
            return Ok(Self::flat(config, vars));
        }
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
        Ok(AdamW {
            config,
            slots,
            flat: None,
            flat_update: false,
        })
    }

    /// Re-homes `vars` into one flat buffer (see the type's doc).
    fn flat(config: AdamWConfig, vars: Vec<(String, Tensor)>) -> Self {
        let flattened: Vec<Tensor> = vars.iter().map(|(_, p)| p.detach().reshape([-1])).collect();
        let param = Tensor::cat(&flattened, 0);
        let exp_avg = param.zeros_like();
        let exp_avg_sq = param.zeros_like();
        let mut offset = 0;
        let slots = vars
            .into_iter()
            .map(|(name, mut p)| {
                let (n, shape) = (p.numel() as i64, p.size());
                let view = |buffer: &Tensor| buffer.narrow(0, offset, n).view(shape.as_slice());
                // Every holder of this tensor (the VarStore, the layers) shares
                // its TensorImpl, so all of them now read the flat buffer.
                tch::no_grad(|| p.set_data(&view(&param)));
                let slot = Slot {
                    exp_avg: view(&exp_avg),
                    exp_avg_sq: view(&exp_avg_sq),
                    name,
                    param: p,
                    steps: 0,
                };
                offset += n;
                slot
            })
            .collect();
        AdamW {
            config,
            flat_update: param.device().is_cuda(),
            slots,
            flat: Some(FlatState {
                param,
                exp_avg,
                exp_avg_sq,
            }),
        }
    }

    /// Chooses between the flat update (one set of kernels over all
    /// parameters) and the per-parameter one, whatever the device; both
    /// compute the same update. Without effect when the parameters could
    /// not be made views of one buffer (mixed devices or dtypes).
    pub fn with_flat_update(mut self, on: bool) -> Self {
        self.flat_update = on && self.flat.is_some();
        self
    }

    /// Whether steps take the flat update (see [`AdamW::with_flat_update`]).
    pub fn flat_update(&self) -> bool {
        self.flat_update
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
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
            let t = self.slots.first().map_or(0, |s| s.steps) + 1;
            let in_step = self.slots.iter().all(|s| s.steps + 1 == t);
            if let Some(flat) = self.flat.as_ref().filter(|_| in_step && self.flat_update) {
                if grads.iter().all(Tensor::defined) {
                    let flattened: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
                    let grad = Tensor::cat(&flattened, 0);
                    update(
                        &self.config,
                        t,
                        &flat.param,
                        &flat.exp_avg,
                        &flat.exp_avg_sq,
                        &grad,
                    );
                    self.slots.iter_mut().for_each(|s| s.steps = t);
                    return;
                }
            }
            for (slot, grad) in self.slots.iter_mut().zip(&grads) {
                if grad.defined() {
                    slot.steps += 1;
                    update(
                        &self.config,
                        slot.steps,
                        &slot.param,
                        &slot.exp_avg,
                        &slot.exp_avg_sq,
                        grad,
                    );
                }
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

/// The AdamW update of step `t` (see [`AdamW`]), in place, in 9 kernels with
/// two temporaries: the update is memory-bound, so passes are what it costs.
fn update(
    config: &AdamWConfig,
    t: i64,
    param: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
) {
    let AdamWConfig {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
    } = *config;
    let step_size = lr / (1.0 - beta1.powi(t as i32));
    let bias_correction2_sqrt = (1.0 - beta2.powi(t as i32)).sqrt();
    let (mut param, mut exp_avg, mut exp_avg_sq) = (
        param.shallow_clone(),
        exp_avg.shallow_clone(),
        exp_avg_sq.shallow_clone(),
    );
    let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
    let _ = exp_avg.lerp_(grad, 1.0 - beta1);
    let _ = exp_avg_sq.lerp_(&grad.square(), 1.0 - beta2);
    // denom = -(sqrt(v) / sqrt(1 - b2^t) + eps) / step_size, so that
    // p += m / denom is p -= step_size * m / (sqrt(v_hat) + eps).
    let mut denom = exp_avg_sq.sqrt();
    let _ = denom
        .g_mul_scalar_(-1.0 / (step_size * bias_correction2_sqrt))
        .g_add_scalar_(-eps / step_size);
    let _ = param.addcdiv_(&exp_avg, &denom);
}
