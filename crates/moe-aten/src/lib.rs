//! libtorch (ATen) operators that `tch` does not bind, reached through a
//! small C++ shim compiled against the same libtorch (`csrc/`).
//!
//! tch's bindings are generated from ATen's operator list, minus the
//! operators that return nothing and take lists of tensors: the `_foreach_`
//! and `_fused_` families that PyTorch's optimizers are built on. This
//! crate exposes what the training loop needs: [`fused_adamw_`], and
//! [`clear_grads`], which tch's API cannot express; [`backward`], a
//! backward pass that returns libtorch's errors (tch's `backward` panics on
//! them); and [`dist`], c10d's process groups (Gloo) and collectives, which
//! tch does not bind at all.
#![warn(missing_docs)]

use moe_core::{check_same_device, MoeError, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, CStr};
use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn moe_aten_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;

    fn moe_aten_clear_grads(
        tensors: *const *const C_tensor,
        n: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

pub mod dist;

/// Runs a shim function that reports failure through a message buffer.
pub(crate) fn call_shim(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut error = [0 as c_char; 1024];
    if f(error.as_mut_ptr(), error.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminated its message (snprintf).
    let message = unsafe { CStr::from_ptr(error.as_ptr()) };
    Err(TchError::Torch(message.to_string_lossy().into_owned()).into())
}

fn handles(list: &[Tensor]) -> Vec<*const C_tensor> {
    list.iter().map(Tensor::as_ptr).collect()
}

/// Drops the gradient of each tensor, as PyTorch's
/// `optimizer.zero_grad(set_to_none=True)` (its default) does: the next
/// backward then stores each gradient instead of adding it into a zeroed
/// buffer, which saves a fill and an add over every parameter per step.
/// Afterwards `t.grad()` is undefined until a backward reaches `t`.
pub fn clear_grads(tensors: &[Tensor]) -> Result<()> {
    let list = handles(tensors);
    // SAFETY: `list` holds live tch handles (`at::Tensor*`) borrowed for the
    // call; the shim writes at most `len` bytes, NUL-terminated, to `error`.
    call_shim(|error, len| unsafe { moe_aten_clear_grads(list.as_ptr(), list.len(), error, len) })
}

/// The prefix `csrc/c10d.cpp` gives the error of a collective that failed
/// inside autograd's backward (the all-to-all's reverse exchange).
const COLLECTIVE_FAILED: &str = "moe_c10d collective failed: ";

/// Runs the backward pass from `loss` (a scalar, usually), accumulating the
/// gradient of every tensor it depends on into `grad()`, as tch's
/// `Tensor::backward` (PyTorch's `loss.backward()`) does, but returning
/// libtorch's error instead of panicking on it.
///
/// Under expert parallelism the backward runs collectives: the
/// all-to-all's gradient goes back through the reverse exchange
/// ([`dist::Group::all_to_all`]). A peer that died, closed its connections
/// or did not take part within the group's timeout makes that exchange
/// fail inside libtorch's autograd engine, which hands the C++ exception
/// back here: it is a [`MoeError::Distributed`] (as the same failure in the
/// forward pass is), any other libtorch error (a graph already freed, a
/// loss that needs no gradient, a failing kernel) a [`MoeError::Torch`].
/// The gradients of a failed backward are partial: the step must not go on.
pub fn backward(loss: &Tensor) -> Result<()> {
    loss.f_backward().map_err(backward_error)
}

/// Classifies the error of a backward pass (see [`backward`]).
fn backward_error(error: TchError) -> MoeError {
    let TchError::Torch(message) = &error else {
        return error.into();
    };
    if let Some(start) = message.find(COLLECTIVE_FAILED) {
        let what = first_lines(&message[start + COLLECTIVE_FAILED.len()..]);
        return MoeError::Distributed(format!("backward pass: {what}"));
    }
    // A c10d or Gloo failure from elsewhere in the graph (a collective this
    // crate did not issue): Gloo's messages name their source file
    // (`gloo/transport/tcp/pair.cc`), c10d's theirs (`ProcessGroupGloo.cpp`).
    let lower = message.to_ascii_lowercase();
    if ["gloo", "c10d", "processgroup", "nccl"]
        .iter()
        .any(|marker| lower.contains(marker))
    {
        return MoeError::Distributed(format!("backward pass: {}", first_lines(message)));
    }
    error.into()
}

/// A libtorch message without the C++ backtrace that follows its first
/// lines (c10d's messages carry one).
pub(crate) fn first_lines(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.contains("Exception raised from"))
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// AdamW's hyper-parameters; `Default` is PyTorch's `torch.optim.AdamW`.
/// The training loop's optimizer (`moe_train::AdamW`) is configured with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first-moment (mean) estimate.
    pub beta1: f64,
    /// Decay of the second-moment (uncentred variance) estimate.
    pub beta2: f64,
    /// Added to the root of the second moment for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr * weight_decay`.
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

/// The tensors of one [`fused_adamw_`] call, index `i` of each list
/// belonging to parameter `i`.
#[derive(Debug)]
pub struct AdamWTensors<'a> {
    /// The parameters, updated in place.
    pub params: &'a [Tensor],
    /// Their gradients.
    pub grads: &'a [Tensor],
    /// Each parameter's first-moment estimate, updated in place.
    pub exp_avgs: &'a [Tensor],
    /// Each parameter's second-moment estimate, updated in place.
    pub exp_avg_sqs: &'a [Tensor],
    /// Each parameter's step count, an f32 scalar on its device.
    pub steps: &'a [Tensor],
}

/// One AdamW step (Loshchilov & Hutter 2019, arXiv 1711.05101) over many
/// parameters with libtorch's fused kernel, `torch._fused_adamw_`, which
/// `torch.optim.AdamW(fused=True)` runs: each step count `t` is first
/// incremented, then, in place and in one pass over each tensor,
///
/// ```text
/// p <- p * (1 - lr * wd)
/// m <- b1 * m + (1 - b1) * g
/// v <- b2 * v + (1 - b2) * g^2
/// p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
///
/// On CUDA the whole list is a few multi-tensor kernel launches and the
/// step counts never leave the device; on CPU each tensor is one vectorised
/// pass instead of the nine of an update written with tensor operations.
/// Every tensor must be on one device with one floating dtype (f32 step
/// counts aside), and the lists must have one length.
pub fn fused_adamw_(tensors: &AdamWTensors<'_>, hyper: &AdamWConfig) -> Result<()> {
    let AdamWTensors {
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
    } = *tensors;
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()] != [n; 4] {
        return Err(MoeError::config(format!(
            "fused AdamW needs one gradient, two moments and a step count per parameter: \
             got {n} parameters, {} gradients, {} + {} moments, {} step counts",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len()
        )));
    }
    if let Some(first) = params.first() {
        for list in [grads, exp_avgs, exp_avg_sqs, steps] {
            for t in list {
                check_same_device(t, "fused AdamW tensor", first.device())?;
            }
        }
    }
    let (p, g, m, v, s) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    // SAFETY: every pointer is a live tch tensor handle (`at::Tensor*`)
    // borrowed for the call, each list holds `n` of them, and the shim
    // writes at most `len` bytes, NUL-terminated, into `error`.
    call_shim(|error, len| unsafe {
        moe_aten_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
            error,
            len,
        )
    })
}
