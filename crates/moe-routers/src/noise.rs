//! Where a noisy gate's standard normal draws come from.
//!
//! [`NoisyTopKRouter`](crate::NoisyTopKRouter) adds `eps * softplus(W_n x)`
//! with `eps ~ N(0, 1)` drawn from libtorch's generator. Inside
//! [`with_given_noise`] the draws are data instead: every noisy gate that
//! runs on this thread takes the next tensor of a tape, in call order (layer
//! after layer of a forward pass, pass after pass). This is how a run is
//! compared with another implementation of the same model (makeMoE's
//! PyTorch code) that drew the same noise, without depending on how either
//! library's generator fills a tensor on a given CPU.
//!
//! The scope is a thread-local, like `tch::no_grad`: nothing else changes,
//! and gates outside the closure draw as before.

use moe_core::{MoeError, Result};
use std::cell::RefCell;
use std::collections::VecDeque;
use tch::Tensor;

thread_local! {
    static TAPE: RefCell<Option<VecDeque<Tensor>>> = const { RefCell::new(None) };
}

/// Runs `f` with every noisy gate of this thread reading its `eps` from
/// `draws`, in order, instead of drawing it. Each draw must have the shape
/// of the gate's logits (`[N, E]`) and is cast to their dtype and device.
/// A gate that finds the tape empty returns an error. Returns `f`'s value
/// and the draws it did not use.
///
/// Scopes do not nest: inside one, another is an error.
pub fn with_given_noise<T>(
    draws: impl IntoIterator<Item = Tensor>,
    f: impl FnOnce() -> T,
) -> Result<(T, Vec<Tensor>)> {
    let tape: VecDeque<Tensor> = draws.into_iter().collect();
    let installed = TAPE.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_some() {
            return false;
        }
        *t = Some(tape);
        true
    });
    if !installed {
        return Err(MoeError::config(
            "with_given_noise inside another with_given_noise: scopes do not nest",
        ));
    }
    // Restores the thread's state even if `f` panics.
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            TAPE.with(|t| t.borrow_mut().take());
        }
    }
    let guard = Uninstall;
    let value = f();
    let left = TAPE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    drop(guard);
    Ok((value, left.into()))
}

/// A standard normal draw shaped like `logits`: the next tensor of the tape
/// inside [`with_given_noise`], else `randn_like`.
pub(crate) fn standard_normal_like(logits: &Tensor) -> Result<Tensor> {
    let given = TAPE.with(|t| {
        t.borrow_mut()
            .as_mut()
            .map(|tape| tape.pop_front().ok_or(()))
    });
    match given {
        None => Ok(logits.randn_like()),
        Some(Err(())) => Err(MoeError::config(
            "a noisy gate ran out of given noise: with_given_noise's tape has \
             fewer draws than gates that ran",
        )),
        Some(Ok(eps)) => {
            if eps.size() != logits.size() {
                return Err(MoeError::Shape {
                    what: "given router noise".into(),
                    expected: format!("the gate's logits' {:?}", logits.size()),
                    got: eps.size(),
                });
            }
            Ok(eps.to_device(logits.device()).to_kind(logits.kind()))
        }
    }
}
