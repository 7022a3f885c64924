use moe_core::{accumulation_kind, check_float, check_same_device, MoeError, Result};
use tch::{nn, Tensor};

/// Root-mean-square layer normalisation (Zhang & Sennrich 2019,
/// arXiv 1910.07467) over the last dimension:
///
/// `y = x / sqrt(mean(x^2) + eps) * weight`,
///
/// as Hugging Face's `LlamaRMSNorm` computes it (`modeling_llama.py`): the
/// normalisation runs in f32, its result is cast back to `x`'s dtype and
/// then multiplied by the weight cast to `x`'s dtype, so the output has
/// `x`'s dtype.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Creates the weight `p/weight`, `[dim]`, initialised to ones.
    ///
    /// `dim` must be positive and `eps` non-negative; [`Self::try_new`]
    /// reports those as errors.
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        let weight = moe_core::var(p, "weight", &[dim], nn::Init::Const(1.0));
        RmsNorm { weight, eps }
    }

    /// [`Self::new`] after checking `dim > 0` and `0 <= eps < inf`.
    pub fn try_new(p: &nn::Path, dim: i64, eps: f64) -> Result<Self> {
        if dim <= 0 {
            return Err(MoeError::config(format!(
                "RMSNorm width must be positive, got {dim}"
            )));
        }
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(MoeError::config(format!(
                "RMSNorm eps must be finite and non-negative, got {eps}"
            )));
        }
        Ok(Self::new(p, dim, eps))
    }

    /// The scale `weight`, `[dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `eps` added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Normalises `x` (`[..., dim]`, floating point, on the weight's device).
    /// Panics (in libtorch) on other shapes; [`Self::try_forward`] checks.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        rms_normalize(x, self.eps) * self.weight.to_kind(x.kind())
    }

    /// [`Self::forward`] after checking that `x` is floating point, has last
    /// dimension `dim` and lives on the weight's device.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.size()[0];
        if x.size().last() != Some(&dim) {
            return Err(MoeError::Shape {
                what: "RMSNorm input".into(),
                expected: format!("last dimension {dim}"),
                got: x.size(),
            });
        }
        check_float(x, "RMSNorm input")?;
        check_same_device(x, "RMSNorm input", self.weight.device())?;
        Ok(self.forward(x))
    }
}

impl nn::Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        RmsNorm::forward(self, xs)
    }
}

/// RMSNorm without a gain, `x / sqrt(mean(x^2) + eps)` over the last
/// dimension, accumulated in f32 (f64 for f64) and returned in `x`'s dtype
/// (Hugging Face's `*RMSNorm._norm`; Llama 4's `Llama4TextL2Norm` is this).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Tensor {
    let wide = accumulation_kind(x.kind());
    let x32 = x.to_kind(wide);
    let mean_square = x32.square().mean_dim(-1, true, wide);
    (x32 * (mean_square + eps).rsqrt()).to_kind(x.kind())
}
