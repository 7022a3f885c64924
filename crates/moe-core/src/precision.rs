use crate::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::{nn, Kind, Tensor};

/// The dtype the layers compute in (mixed-precision training, Micikevicius
/// et al. 2018, arXiv 1710.03740, with bf16 instead of fp16 so that no loss
/// scaling is needed).
///
/// Parameters are always stored in f32: they are the optimizer's master
/// copy. With [`Precision::Bf16`] the matrix products (attention
/// projections and scores, experts, shared experts) run in bf16 with the
/// weights cast at use, as PyTorch's autocast does for matmuls; layer norms,
/// the residual stream, router logits and softmax, the LM head and the loss
/// stay f32. Gradients reach the f32 parameters through the casts.
///
/// [`Precision::Fp64`] is for numerical checks: with the parameters
/// converted to f64 as well (`VarStore::double`), every operation runs in
/// f64, where rounding (`2^-53`) no longer decides a ReLU's kink or a top-k
/// tie, so that two implementations of a model can be compared as functions
/// (`moe-layers-train`'s test against makeMoE's PyTorch code does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum Precision {
    #[default]
    /// Everything in f32.
    Fp32,
    /// Matrix products in bf16, the rest in f32 (autocast-style).
    Bf16,
    /// Matrix products in f64; everything in f64 with f64 parameters.
    Fp64,
}

impl Precision {
    /// The compute dtype.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp64 => Kind::Double,
        }
    }
}

impl FromStr for Precision {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp64" | "f64" | "float64" => Ok(Precision::Fp64),
            other => Err(MoeError::config(format!(
                "unknown precision `{other}`: expected fp32, bf16 or fp64"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp64 => "fp64",
        })
    }
}

/// The dtype softmaxes, norms and losses accumulate in for inputs of
/// `kind`: f64 for f64, f32 for everything else (bf16 and f16 inputs are
/// widened, as PyTorch's autocast does for these ops).
pub fn accumulation_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// `t` in the dtype of `like` (the same tensor, no copy, when they match):
/// how a layer brings its f32 parameters to its input's compute dtype.
pub fn as_kind_of(t: &Tensor, like: &Tensor) -> Tensor {
    t.to_kind(like.kind())
}

/// A router's logits `l = x W_g^T (+ b_g)` in the accumulation dtype of
/// `x` ([`accumulation_kind`]: f32 for bf16 and f16 inputs): a top-k choice
/// between close logits must not depend on the compute dtype's rounding
/// (DeepSeek-V3's gate in transformers computes in f32 likewise). The gate
/// is `E x d`, so the casts cost nothing next to the experts.
pub fn router_logits(x: &Tensor, gate: &nn::Linear) -> Tensor {
    let wide = accumulation_kind(x.kind());
    let bias = gate.bs.as_ref().map(|b| b.to_kind(wide));
    x.to_kind(wide)
        .linear(&gate.ws.to_kind(wide), bias.as_ref())
}

/// `y = x W^T + b` computed in `x`'s dtype ([`Precision`]); one bf16 row on
/// the CPU goes through [`crate::gemv::linear`].
pub fn linear_in_input_dtype(x: &Tensor, layer: &nn::Linear) -> Tensor {
    if let Some(y) = crate::gemv::linear(x, &layer.ws, layer.bs.as_ref()) {
        return y;
    }
    let bias = layer.bs.as_ref().map(|b| as_kind_of(b, x));
    x.linear(&as_kind_of(&layer.ws, x), bias.as_ref())
}
