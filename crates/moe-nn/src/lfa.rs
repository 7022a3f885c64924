use crate::RmsNorm;
use moe_core::{
    as_kind_of, check_float, check_rank, check_same_device, MoeError, Result, WeightInit,
};
use tch::{nn, Tensor};

/// The input filter of Yuan 2.0's Localized Filtering-based Attention (LFA,
/// Wu et al. 2023, arXiv 2311.15786; the `LocalizedFiltering` module of
/// Hugging Face's `modeling_yuan.py`), which gives queries and keys a view
/// of the preceding token:
///
/// `LF(x) = RMSNorm(conv2(conv1(x)) + x)`,
///
/// where `conv1: C -> C/2` and `conv2: C/2 -> C` are causal convolutions of
/// width 2 along the sequence, with bias,
///
/// `conv(x)[t] = W[:, :, 0, 0] x[t-1] + W[:, :, 1, 0] x[t] + b`,
///
/// and zero padding before the first position (`x[-1] = 0` for `conv1`, and
/// `conv2`'s input at `t = -1` is 0, not `conv1` of the padding).
///
/// Parameters, with Yuan's names and `nn.Conv2d`'s layout (kernel `(2, 1)`
/// over `(sequence, 1)`): `conv1/weight [C/2, C, 2, 1]`, `conv1/bias [C/2]`,
/// `conv2/weight [C, C/2, 2, 1]`, `conv2/bias [C]`,
/// `output_layernorm/weight [C]`.
#[derive(Debug)]
pub struct LocalizedFiltering {
    conv1: CausalConv,
    conv2: CausalConv,
    output_layernorm: RmsNorm,
    hidden_size: i64,
}

/// What a [`LocalizedFiltering`] needs of the positions before a chunk to
/// filter it as part of the whole sequence: the last input `x[t-1]`
/// (`[B, C]`) and the last `conv1` output (`[B, C/2]`).
#[derive(Debug)]
pub(crate) struct LfState {
    pub(crate) last_input: Tensor,
    pub(crate) last_conv1: Tensor,
}

impl LocalizedFiltering {
    /// Creates the parameters under `p` (Yuan names it `lf_gate`). The
    /// convolution weights follow `init` with fans `2 C_in` and `2 C_out`,
    /// their biases PyTorch's default for fan-in `2 C_in`; the norm weight
    /// starts at ones. Errors unless `hidden_size` is positive and even.
    pub fn new(p: &nn::Path, hidden_size: i64, eps: f64, init: WeightInit) -> Result<Self> {
        if hidden_size <= 0 || hidden_size % 2 != 0 {
            return Err(MoeError::config(format!(
                "localized filtering needs a positive, even hidden_size, got {hidden_size}"
            )));
        }
        let (c, half) = (hidden_size, hidden_size / 2);
        Ok(LocalizedFiltering {
            conv1: CausalConv::new(&(p / "conv1"), c, half, init),
            conv2: CausalConv::new(&(p / "conv2"), half, c, init),
            output_layernorm: RmsNorm::try_new(&(p / "output_layernorm"), c, eps)?,
            hidden_size,
        })
    }

    /// Filters a whole sequence, `x`: `[B, T, C]` (`T >= 1`), into
    /// `[B, T, C]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_rank(
            x,
            "localized filtering input [B, T, C]",
            3,
            Some(self.hidden_size),
        )?;
        check_float(x, "localized filtering input")?;
        check_same_device(x, "localized filtering input", self.conv1.weight.device())?;
        if x.size()[1] == 0 {
            return Err(MoeError::Shape {
                what: "localized filtering input [B, T, C]".into(),
                expected: "at least one position".into(),
                got: x.size(),
            });
        }
        Ok(self.forward_with_state(x, None).0)
    }

    /// Filters the chunk `x` (`[B, T, C]`, `T >= 1`, checked by the caller)
    /// that follows the positions summarised by `state` (none: the chunk
    /// starts the sequence); returns the output and the state after it.
    pub(crate) fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<&LfState>,
    ) -> (Tensor, LfState) {
        let (b, t, c) = x.size3().expect("checked rank 3");
        let zeros = |width: i64| x.new_zeros([b, width], (x.kind(), x.device()));
        let (prev_input, prev_conv1) = match state {
            Some(s) => (s.last_input.shallow_clone(), s.last_conv1.shallow_clone()),
            None => (zeros(c), zeros(c / 2)),
        };
        let conv1 = self.conv1.forward(x, &prev_input);
        let conv2 = self.conv2.forward(&conv1, &prev_conv1);
        let out = self.output_layernorm.forward(&(conv2 + x));
        let state = LfState {
            last_input: x.select(1, t - 1),
            last_conv1: conv1.select(1, t - 1),
        };
        (out, state)
    }
}

/// A width-2 causal convolution along the sequence stored as `nn.Conv2d`
/// (`weight [C_out, C_in, 2, 1]`, `bias [C_out]`).
#[derive(Debug)]
struct CausalConv {
    weight: Tensor,
    bias: Tensor,
}

impl CausalConv {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, init: WeightInit) -> Self {
        let weight = moe_core::var(
            p,
            "weight",
            &[c_out, c_in, 2, 1],
            init.weight(2 * c_in, 2 * c_out),
        );
        let bias = moe_core::var(p, "bias", &[c_out], WeightInit::bias(2 * c_in));
        CausalConv { weight, bias }
    }

    /// `y[t] = W_0 x[t-1] + W_1 x[t] + b` for `x`: `[B, T, C_in]`, with
    /// `x[-1] = prev` (`[B, C_in]`), in `x`'s dtype.
    fn forward(&self, x: &Tensor, prev: &Tensor) -> Tensor {
        let t = x.size()[1];
        let weight = as_kind_of(&self.weight, x).select(3, 0);
        let shifted = Tensor::cat(&[&prev.unsqueeze(1), &x.narrow(1, 0, t - 1)], 1);
        shifted.linear::<Tensor>(&weight.select(2, 0), None)
            + x.linear(&weight.select(2, 1), Some(&as_kind_of(&self.bias, x)))
    }
}
