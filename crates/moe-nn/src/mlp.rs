use moe_core::{
    check_float, check_same_device, linear, linear_in_input_dtype, MoeError, Result, WeightInit,
};
use tch::{nn, Tensor};

/// The dense SwiGLU feed-forward network of Llama-style decoders (Shazeer
/// 2020, "GLU Variants Improve Transformer", arXiv 2002.05202; Hugging
/// Face's `LlamaMLP` in `modeling_llama.py`, also the expert and shared
/// expert of Mixtral, Qwen2-MoE, DeepSeek-V3 and OLMoE):
///
/// `y = down_proj(silu(gate_proj(x)) * up_proj(x))`, `silu(z) = z * sigmoid(z)`,
///
/// with `gate_proj`, `up_proj`: `hidden -> intermediate` and `down_proj`:
/// `intermediate -> hidden`, computed in `x`'s dtype (the f32 weights are
/// cast at use).
#[derive(Debug)]
pub struct SwiGluMlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
    hidden_size: i64,
}

impl SwiGluMlp {
    /// Creates `p/gate_proj`, `p/up_proj` and `p/down_proj`, with biases when
    /// `bias` is set. Errors unless both sizes are positive.
    pub fn new(
        p: &nn::Path,
        hidden_size: i64,
        intermediate_size: i64,
        bias: bool,
        init: WeightInit,
    ) -> Result<Self> {
        if hidden_size <= 0 || intermediate_size <= 0 {
            return Err(MoeError::config(format!(
                "SwiGLU MLP sizes must be positive, got hidden_size {hidden_size} and \
                 intermediate_size {intermediate_size}"
            )));
        }
        let (h, i) = (hidden_size, intermediate_size);
        Ok(SwiGluMlp {
            gate_proj: linear(p / "gate_proj", h, i, bias, init),
            up_proj: linear(p / "up_proj", h, i, bias, init),
            down_proj: linear(p / "down_proj", i, h, bias, init),
            hidden_size,
        })
    }

    /// `x`: `[..., hidden_size]`, floating point; returns `[..., hidden_size]`
    /// in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim() == 0 || x.size().last() != Some(&self.hidden_size) {
            return Err(MoeError::Shape {
                what: "SwiGLU MLP input".into(),
                expected: format!("last dimension {}", self.hidden_size),
                got: x.size(),
            });
        }
        check_float(x, "SwiGLU MLP input")?;
        check_same_device(x, "SwiGLU MLP input", self.gate_proj.ws.device())?;
        let gate = linear_in_input_dtype(x, &self.gate_proj).silu();
        let up = linear_in_input_dtype(x, &self.up_proj);
        Ok(linear_in_input_dtype(&(gate * up), &self.down_proj))
    }
}
