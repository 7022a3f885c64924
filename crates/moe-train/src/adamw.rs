//! AdamW with its state in plain tensors, so that it can be checkpointed
//! (tch's `nn::Optimizer` keeps its state inside libtorch, out of reach).

use crate::tensor_file::{read_tensors, write_tensors};
pub use moe_aten::AdamWConfig;
use moe_aten::AdamWTensors;
use moe_core::{MoeError, Result};
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// One parameter and its moment estimates.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Steps this parameter took (PyTorch keeps one count per parameter).
    steps: i64,
    /// `steps` as the f32 scalar on the parameter's device that the fused
    /// kernel reads and increments, so that a GPU step never waits on the
    /// host for it.
    step_count: Tensor,
    /// Whether weight decay applies to this parameter.
    decay: bool,
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
/// When every parameter lives on one device with one dtype (always, for
/// the language model), a step is one call of libtorch's fused AdamW
/// kernel ([`moe_aten::fused_adamw_`], PyTorch's `AdamW(fused=True)`): on
/// a GPU a few multi-tensor launches instead of about 900 small kernels
/// for the makeMoE model, whose GPU step is bound by launches; on a CPU
/// one pass over each tensor instead of nine. Otherwise, or after
/// [`AdamW::set_fused`]`(false)`, each parameter is updated with nine
/// tensor operations.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Whether the parameters share one device and dtype (the fused
    /// kernel's requirement).
    fusable: bool,
    fused: bool,
}

impl AdamW {
    /// Over every trainable variable of `vs`, in name order, all decayed.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> Result<Self> {
        Self::with_no_decay(vs, config, |_, _| false)
    }

    /// Over every trainable variable of `vs`, in name order; weight decay
    /// skips the variables for which `no_decay(name, shape)` holds (nanoGPT's
    /// two parameter groups: biases, norms and embeddings undecayed).
    pub fn with_no_decay(
        vs: &nn::VarStore,
        config: AdamWConfig,
        no_decay: impl Fn(&str, &[i64]) -> bool,
    ) -> Result<Self> {
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
        let fusable = vars
            .windows(2)
            .all(|w| (w[0].1.device(), w[0].1.kind()) == (w[1].1.device(), w[1].1.kind()));
        let slots = vars
            .into_iter()
            .map(|(name, param)| Slot {
                decay: !no_decay(&name, &param.size()),
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                step_count: Tensor::zeros([], (Kind::Float, param.device())),
                name,
                param,
                steps: 0,
            })
            .collect();
        Ok(AdamW {
            config,
            slots,
            fusable,
            fused: fusable,
        })
    }

    /// Chooses between the fused kernel and the update written as tensor
    /// operations; both compute the same update. Without effect when the
    /// parameters do not share one device and dtype (then never fused).
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on && self.fusable;
    }

    /// Whether steps run the fused kernel (see [`AdamW::set_fused`]).
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Sets the learning rate of the next steps (schedules call it each step).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Drops every parameter's gradient (PyTorch's default
    /// `zero_grad(set_to_none=True)`): the next backward stores fresh
    /// gradients instead of adding into zeroed ones, a fill and an add over
    /// all parameters saved per step. Until then `param.grad()` is undefined.
    pub fn zero_grad(&mut self) -> Result<()> {
        let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
        moe_aten::clear_grads(&params)
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<()> {
        let (decayed, undecayed) = (self.group_config(true), self.group_config(false));
        let group_config = |decay: bool| if decay { decayed } else { undecayed };
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
            let (slots, grads): (Vec<&mut Slot>, Vec<Tensor>) = self
                .slots
                .iter_mut()
                .zip(grads)
                .filter(|(_, g)| g.defined())
                .unzip();
            if self.fused {
                // One kernel call per weight-decay group.
                for decay in [true, false] {
                    let group: Vec<(&&mut Slot, &Tensor)> = slots
                        .iter()
                        .zip(&grads)
                        .filter(|(s, _)| s.decay == decay)
                        .collect();
                    if group.is_empty() {
                        continue;
                    }
                    let list = |f: fn(&Slot) -> &Tensor| {
                        group
                            .iter()
                            .map(|(s, _)| f(s).shallow_clone())
                            .collect::<Vec<_>>()
                    };
                    let group_grads: Vec<Tensor> =
                        group.iter().map(|(_, g)| g.shallow_clone()).collect();
                    moe_aten::fused_adamw_(
                        &AdamWTensors {
                            params: &list(|s| &s.param),
                            grads: &group_grads,
                            exp_avgs: &list(|s| &s.exp_avg),
                            exp_avg_sqs: &list(|s| &s.exp_avg_sq),
                            steps: &list(|s| &s.step_count),
                        },
                        &group_config(decay),
                    )?;
                }
                slots.into_iter().for_each(|s| s.steps += 1);
                return Ok(());
            }
            for (slot, grad) in slots.into_iter().zip(&grads) {
                slot.steps += 1;
                let _ = slot.step_count.fill_(slot.steps as f64);
                update(
                    &group_config(slot.decay),
                    slot.steps,
                    &slot.param,
                    &slot.exp_avg,
                    &slot.exp_avg_sq,
                    grad,
                );
            }
            Ok(())
        })
    }

    /// The hyper-parameters of a weight-decay group: the config's, with
    /// weight decay 0 for the undecayed group.
    fn group_config(&self, decay: bool) -> AdamWConfig {
        AdamWConfig {
            weight_decay: if decay { self.config.weight_decay } else { 0.0 },
            ..self.config
        }
    }

    /// Names of the variables weight decay skips.
    pub fn no_decay_names(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| !s.decay)
            .map(|s| s.name.as_str())
            .collect()
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
                let _ = slot.step_count.fill_(steps as f64);
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
