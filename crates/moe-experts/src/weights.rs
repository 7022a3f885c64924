use crate::{plus_bias, Activation};
use moe_core::{MoeError, Result};
use tch::Tensor;

/// The weights of one dense two-layer FFN in the bank's layout (no expert
/// dimension): `w_in, w_gate: [d, h]`, `b_in, b_gate: [h]`, `w_out: [h, d]`,
/// `b_out: [d]`,
///
/// `FFN(x) = act(x) w_out (+ b_out)`, `act(x) = ReLU(x w_in (+ b_in))` or
/// `SiLU(x w_gate (+ b_gate)) * (x w_in (+ b_in))`; LLaMA's FFN has no biases.
///
/// The source of LLaMA-MoE's expert construction and of upcycling.
#[derive(Debug)]
pub struct DenseFfnWeights {
    /// Input projection `[d, h]`.
    pub w_in: Tensor,
    /// `None` for an FFN without input bias.
    pub b_in: Option<Tensor>,
    /// SwiGLU only.
    pub w_gate: Option<Tensor>,
    /// The gate's bias `[h]`: SwiGLU with biases only.
    pub b_gate: Option<Tensor>,
    /// Output projection `[h, d]`.
    pub w_out: Tensor,
    /// `None` for an FFN without output bias.
    pub b_out: Option<Tensor>,
}

/// Weights of `E` experts, stacked as in [`crate::ExpertBank`]: `w_in,
/// w_gate: [E, d, h]`, `b_in: [E, h]`, `w_out: [E, h, d]`, `b_out: [E, d]`;
/// the biases are `None` for experts without them.
#[derive(Debug)]
pub struct BankWeights {
    /// Input projections `[E, d, h]`.
    pub w_in: Tensor,
    /// Input biases `[E, h]`, `None` without biases.
    pub b_in: Option<Tensor>,
    /// Gate projections `[E, d, h]` (SwiGLU only).
    pub w_gate: Option<Tensor>,
    /// Gate biases `[E, h]` (SwiGLU with biases only).
    pub b_gate: Option<Tensor>,
    /// Output projections `[E, h, d]`.
    pub w_out: Tensor,
    /// Output biases `[E, d]`, `None` without biases.
    pub b_out: Option<Tensor>,
}

impl DenseFfnWeights {
    /// Width `d` and hidden width `h`, after checking the shapes agree.
    pub fn dims(&self) -> Result<(i64, i64)> {
        let wrong = |what: &str, expected: String, got: Vec<i64>| MoeError::Shape {
            what: format!("dense FFN {what}"),
            expected,
            got,
        };
        let w_in = self.w_in.size();
        if w_in.len() != 2 {
            return Err(wrong("w_in", "[d, h]".into(), w_in));
        }
        let (d, h) = (w_in[0], w_in[1]);
        let checks = [
            ("b_in", vec![h], self.b_in.as_ref()),
            ("w_out", vec![h, d], Some(&self.w_out)),
            ("b_out", vec![d], self.b_out.as_ref()),
            ("w_gate", vec![d, h], self.w_gate.as_ref()),
            ("b_gate", vec![h], self.b_gate.as_ref()),
        ];
        for (what, want, got) in checks {
            if let Some(got) = got.map(Tensor::size).filter(|got| *got != want) {
                return Err(wrong(what, format!("{want:?}"), got));
            }
        }
        if self.b_gate.is_some() && self.w_gate.is_none() {
            return Err(MoeError::config(
                "dense FFN weights with a gate bias (b_gate) but no gate (w_gate)",
            ));
        }
        Ok((d, h))
    }

    /// The activation these weights imply: SwiGLU when there is a gate.
    pub fn activation(&self) -> Activation {
        match self.w_gate {
            Some(_) => Activation::SwiGlu,
            None => Activation::Relu,
        }
    }

    /// `FFN(x)` for `x: [N, d]` (no dropout): the reference that split
    /// experts must add up to.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let pre = plus_bias(
            x.matmul(&self.w_in),
            self.b_in.as_ref().map(Tensor::shallow_clone),
        );
        let hidden = match &self.w_gate {
            Some(g) => {
                let gate = plus_bias(x.matmul(g), self.b_gate.as_ref().map(Tensor::shallow_clone));
                gate.silu() * pre
            }
            None => pre.relu(),
        };
        plus_bias(
            hidden.matmul(&self.w_out),
            self.b_out.as_ref().map(Tensor::shallow_clone),
        )
    }
}
