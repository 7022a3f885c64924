use crate::RopeScaling;
use moe_core::{check_float, check_rank, check_same_device, MoeError, Result};
use tch::{Device, Kind, Tensor};

/// The default inverse frequencies of rotary embeddings,
/// `inv_freq[i] = theta^(-2i / head_dim)` for `i in 0..head_dim / 2`, `[head_dim / 2]`
/// in f32, computed as Hugging Face's `_compute_default_rope_parameters`
/// (`modeling_rope_utils.py`) does, in f32.
///
/// Errors unless `head_dim` is positive and even and `theta` positive and
/// finite.
pub fn default_inv_freq(head_dim: i64, theta: f64, device: Device) -> Result<Tensor> {
    if head_dim <= 0 || head_dim % 2 != 0 {
        return Err(MoeError::config(format!(
            "RoPE head_dim must be positive and even, got {head_dim}"
        )));
    }
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(MoeError::config(format!(
            "RoPE theta must be positive and finite, got {theta}"
        )));
    }
    Ok(rope_pos_freqs(head_dim, theta, device).reciprocal())
}

/// `theta^(2i / head_dim)` for `i in 0..head_dim / 2`, f32 (Hugging Face's
/// `pos_freqs`), unchecked: the reciprocals of the default inverse
/// frequencies.
pub(crate) fn rope_pos_freqs(head_dim: i64, theta: f64, device: Device) -> Tensor {
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device))
        .to_kind(Kind::Float)
        / head_dim as f64;
    Tensor::pow_scalar(theta, &exponents)
}

/// The `cos` and `sin` tables of rotary embeddings for positions
/// `0..max_positions` and the inverse frequencies `inv_freq` (`[head_dim / 2]`),
/// each `[max_positions, head_dim]` in f32 on `inv_freq`'s device:
/// `angle[m, i] = m * inv_freq[i mod head_dim / 2]`, the frequencies laid out
/// twice as Hugging Face's `cat((freqs, freqs), -1)`.
///
/// Rope scaling schemes (linear, dynamic NTK, YaRN, Llama 3) change only the
/// inverse frequencies (and YaRN the scale of the tables): [`Rope::with_scaling`]
/// calls this with [`RopeScaling::parameters`]' `inv_freq`.
pub fn rope_tables(inv_freq: &Tensor, max_positions: i64) -> Result<(Tensor, Tensor)> {
    check_rank(inv_freq, "RoPE inverse frequencies [head_dim / 2]", 1, None)?;
    check_float(inv_freq, "RoPE inverse frequencies")?;
    if inv_freq.size()[0] == 0 {
        return Err(MoeError::config(
            "RoPE needs at least one inverse frequency",
        ));
    }
    if max_positions <= 0 {
        return Err(MoeError::config(format!(
            "RoPE max_positions must be positive, got {max_positions}"
        )));
    }
    let inv_freq = inv_freq.to_kind(Kind::Float);
    let positions =
        Tensor::arange(max_positions, (Kind::Int64, inv_freq.device())).to_kind(Kind::Float);
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let angles = Tensor::cat(&[&freqs, &freqs], -1);
    Ok((angles.cos(), angles.sin()))
}

/// Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) in
/// Hugging Face's convention (`modeling_llama.py`'s `apply_rotary_pos_emb`):
///
/// `rope(x, m) = x * cos(m θ) + rotate_half(x) * sin(m θ)`,
/// `rotate_half([x1, x2]) = [-x2, x1]`,
///
/// where `x1`, `x2` are the two halves of the head dimension, so that
/// components `i` and `i + head_dim / 2` rotate together by the angle
/// `m * inv_freq[i]`. Then `<rope(q, m), rope(k, n)>` depends on `m - n`
/// only.
///
/// With a [`RopeScaling`] ([`Rope::with_scaling`]) the inverse frequencies
/// are the scheme's and both tables are multiplied by its attention factor
/// (YaRN's), as Hugging Face's rotary embedding classes do (`cos =
/// emb.cos() * self.attention_scaling`).
///
/// [`Rope::apply_interleaved`] is the layout of DeepSeek's checkpoints
/// (`rope_interleave`).
///
/// The tables are plain tensors on the device given at construction, not
/// parameters: they do not follow a `VarStore` moved to another device.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    attention_factor: f64,
}

impl Rope {
    /// Tables for `head_dim` (even) and positions `0..max_positions` with
    /// the default inverse frequencies of base `theta` ([`default_inv_freq`]).
    pub fn new(head_dim: i64, max_positions: i64, theta: f64, device: Device) -> Result<Rope> {
        Self::from_inv_freq(&default_inv_freq(head_dim, theta, device)?, max_positions)
    }

    /// Tables for given inverse frequencies ([`rope_tables`]).
    pub fn from_inv_freq(inv_freq: &Tensor, max_positions: i64) -> Result<Rope> {
        let (cos, sin) = rope_tables(inv_freq, max_positions)?;
        Ok(Rope {
            cos,
            sin,
            attention_factor: 1.0,
        })
    }

    /// Tables for `head_dim` (even), positions `0..max_positions` and base
    /// `theta`, with the inverse frequencies of `scaling`
    /// ([`RopeScaling::parameters`]) and both tables multiplied by its
    /// attention factor; [`Rope::new`] when `scaling` is `None`.
    pub fn with_scaling(
        head_dim: i64,
        max_positions: i64,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: Device,
    ) -> Result<Rope> {
        let Some(scaling) = scaling else {
            return Self::new(head_dim, max_positions, theta, device);
        };
        let (inv_freq, attention_factor) =
            scaling.parameters(head_dim, max_positions, theta, device)?;
        let (cos, sin) = rope_tables(&inv_freq, max_positions)?;
        Ok(Rope {
            cos: cos * attention_factor,
            sin: sin * attention_factor,
            attention_factor,
        })
    }

    /// Width of the heads it rotates.
    pub fn head_dim(&self) -> i64 {
        self.cos.size()[1]
    }

    /// Number of positions of the tables.
    pub fn max_positions(&self) -> i64 {
        self.cos.size()[0]
    }

    /// The `cos` table, `[max_positions, head_dim]`, f32.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// The `sin` table, `[max_positions, head_dim]`, f32.
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// The factor both tables were multiplied by (1 without YaRN).
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// Rotates `x`, `[B, H, T, head_dim]`, whose positions are
    /// `start..start + T`; the result has `x`'s dtype (the tables are cast
    /// to it, as Hugging Face does).
    pub fn apply(&self, x: &Tensor, start: i64) -> Result<Tensor> {
        self.check(x, start)?;
        Ok(self.rotate(x, start))
    }

    /// Rotary embeddings in the interleaved layout of DeepSeek's checkpoints
    /// (Hugging Face's `apply_rotary_pos_emb_interleave`, used when a
    /// DeepSeek-V2/V3 config has `rope_interleave`): components `2i` and
    /// `2i + 1` rotate together by the angle `m * inv_freq[i]`, and the
    /// result is laid out as Hugging Face returns it, the rotated even
    /// components then the rotated odd ones:
    ///
    /// `y = [x_even * cos - x_odd * sin, x_odd * cos + x_even * sin]`,
    ///
    /// i.e. [`Self::apply`] of `x` de-interleaved into `[x_even, x_odd]`.
    /// Queries and keys rotated this way have the scores of the pairwise
    /// (GPT-J, Meta's complex-number) rotation, since they share the
    /// permutation. Same shapes, positions and checks as [`Self::apply`].
    pub fn apply_interleaved(&self, x: &Tensor, start: i64) -> Result<Tensor> {
        self.check(x, start)?;
        Ok(self.rotate_interleaved(x, start))
    }

    /// Shape, dtype, device and positions of an input of [`Self::apply`].
    fn check(&self, x: &Tensor, start: i64) -> Result<()> {
        check_rank(
            x,
            "RoPE input [B, H, T, head_dim]",
            4,
            Some(self.head_dim()),
        )?;
        check_float(x, "RoPE input")?;
        check_same_device(x, "RoPE input", self.cos.device())?;
        let t = x.size()[2];
        if start < 0 {
            return Err(MoeError::config(format!(
                "RoPE start position must be non-negative, got {start}"
            )));
        }
        if start + t > self.max_positions() {
            return Err(MoeError::SequenceTooLong {
                len: start + t,
                block_size: self.max_positions(),
            });
        }
        Ok(())
    }

    /// [`Self::apply`] without the checks.
    pub(crate) fn rotate(&self, x: &Tensor, start: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.cos.narrow(0, start, t).to_kind(x.kind());
        let sin = self.sin.narrow(0, start, t).to_kind(x.kind());
        x * cos + rotate_half(x) * sin
    }

    /// [`Self::apply_interleaved`] without the checks.
    pub(crate) fn rotate_interleaved(&self, x: &Tensor, start: i64) -> Tensor {
        let d = self.head_dim();
        let halves = x
            .unflatten(-1, [d / 2, 2])
            .transpose(-1, -2)
            .flatten(-2, -1);
        self.rotate(&halves, start)
    }
}

/// `[x1, x2] -> [-x2, x1]` over the halves of the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}
