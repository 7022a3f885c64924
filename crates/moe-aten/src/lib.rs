//! libtorch (ATen) operators that `tch` does not bind, reached through a
//! small C++ shim compiled against the same libtorch (`csrc/`).
//!
//! tch's bindings are generated from ATen's operator list, minus the
//! operators that return nothing and take lists of tensors: the `_foreach_`
//! and `_fused_` families that PyTorch's optimizers are built on. This
//! crate exposes the one the training loop needs, [`fused_adamw_`].

use moe_core::{check_same_device, MoeError, Result};
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
}

/// AdamW's hyper-parameters, as [`fused_adamw_`] takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The tensors of one [`fused_adamw_`] call, index `i` of each list
/// belonging to parameter `i`.
#[derive(Debug)]
pub struct AdamWTensors<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
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
pub fn fused_adamw_(tensors: &AdamWTensors<'_>, hyper: AdamWHyper) -> Result<()> {
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
    let handles = |list: &[Tensor]| list.iter().map(Tensor::as_ptr).collect::<Vec<_>>();
    let (p, g, m, v, s) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    let mut error = [0 as c_char; 1024];
    // SAFETY: every pointer is a live tch tensor handle (`at::Tensor*`)
    // borrowed for the call, each list holds `n` of them, and the shim
    // writes at most `error.len()` bytes, NUL-terminated, into `error`.
    let status = unsafe {
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
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status == 0 {
        Ok(())
    } else {
        // SAFETY: the shim NUL-terminated the message (snprintf).
        let message = unsafe { CStr::from_ptr(error.as_ptr()) };
        Err(TchError::Torch(message.to_string_lossy().into_owned()).into())
    }
}
