//! Weight-only int8 quantisation of expert banks.
//!
//! Each weight matrix of each expert is stored as int8 values with one f32
//! scale per output channel (symmetric, per-channel weight-only
//! quantisation, as LLM.int8()'s vector-wise weights without the outlier
//! split, Dettmers et al. 2022, arXiv 2208.07339, and torchao's
//! `int8_weight_only`, whose kernel is libtorch's `_weight_int8pack_mm`):
//!
//! `s_o = max_i |W[i, o]| / 127`, `q[o, i] = clamp(round(W[i, o] / s_o), -127, 127)`,
//! `W[i, o] ~ q[o, i] s_o`,
//!
//! so every weight is within `s_o / 2` of its dequantised value (rounding
//! to nearest) and the channel's largest weight maps to `+-127` exactly.
//! Activations stay in their dtype: `x W ~ (x q^T) * s`, accumulated in
//! f32 by every kernel used here.

use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// How an [`crate::ExpertBank`]'s weight matrices are stored
/// ([`crate::ExpertBank::quantize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExpertQuantization {
    /// Weight-only int8 with one scale per expert and output channel
    /// ([`Int8Weight`]): 1 byte per weight instead of 2 (bf16) or 4 (f32),
    /// plus 4 bytes per output channel.
    Int8,
}

impl FromStr for ExpertQuantization {
    type Err = MoeError;

    /// `int8` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(ExpertQuantization::Int8),
            other => Err(MoeError::config(format!(
                "unknown expert quantization `{other}`: expected int8"
            ))),
        }
    }
}

impl fmt::Display for ExpertQuantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExpertQuantization::Int8 => "int8",
        })
    }
}

/// The scale given to an output channel whose weights are all zero: its
/// int8 values are all 0 whatever the scale, so the dequantised channel is
/// exactly 0, and 1 keeps `w / s` finite.
pub const ZERO_CHANNEL_SCALE: f64 = 1.0;

/// `rows: [out, in]` (any float dtype) as int8 values `[out, in]` and f32
/// scales `[out]` (the rule of [`Int8Weight::quantize`]).
fn quantize_rows(rows: &Tensor) -> (Tensor, Tensor) {
    let rows = rows.to_kind(Kind::Float);
    let amax = rows.abs().amax([-1].as_slice(), false);
    let scales = (&amax / 127.0)
        .where_self(&amax.gt(0.0), &amax.full_like(ZERO_CHANNEL_SCALE))
        .clamp_min(f64::from(f32::MIN_POSITIVE));
    let values = (rows / scales.unsqueeze(-1))
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (values, scales)
}

/// One stacked weight matrix of a bank in int8 (per-output-channel
/// symmetric scales, see the module docs).
///
/// `values: [E, out, in]` int8, contiguous — expert `e`'s `[out, in]` is
/// the `[N, K]` weight that libtorch's `_weight_int8pack_mm` takes, the
/// transpose of the bank's float layout `[E, in, out]` — and
/// `scales: [E, out]` f32. It holds `E out in + 4 E out` bytes.
#[derive(Debug)]
pub struct Int8Weight {
    values: Tensor,
    scales: Tensor,
}

impl Int8Weight {
    /// Quantises `w: [E, in, out]` (the bank's layout: `w_in`, `w_gate`
    /// `[E, d, h]`, `w_out` `[E, h, d]`) per expert and output channel:
    /// `s[e, o] = max_i |w[e, i, o]| / 127` ([`ZERO_CHANNEL_SCALE`] for an
    /// all-zero channel; the scale is at least `f32::MIN_POSITIVE`, so that
    /// subnormal weights do not divide by an underflowed 0),
    /// `q[e, o, i] = clamp(round(w[e, i, o] / s[e, o]), -127, 127)`,
    /// computed in f32 (exact for bf16 and f32 weights; libtorch's `round`
    /// rounds halves to even). No gradient is recorded.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let size = w.size();
        if size.len() != 3 {
            return Err(MoeError::Shape {
                what: "expert weight to quantise".into(),
                expected: "[E, in, out]".into(),
                got: size,
            });
        }
        if !w.is_floating_point() {
            return Err(MoeError::Kind {
                what: "expert weight to quantise".into(),
                expected: "a floating-point dtype".into(),
                got: w.kind(),
            });
        }
        Ok(Self::from_experts(&w.unbind(0)))
    }

    /// [`Int8Weight::quantize`] of the experts' `[in, out]` matrices given
    /// one by one (views of a checkpoint's files, say): one expert's f32
    /// temporaries at a time, never the whole bank's.
    pub fn from_experts(experts: &[Tensor]) -> Self {
        tch::no_grad(|| {
            let (values, scales): (Vec<Tensor>, Vec<Tensor>) =
                experts.iter().map(|w| quantize_rows(&w.tr())).unzip();
            Int8Weight {
                values: Tensor::stack(&values, 0),
                scales: Tensor::stack(&scales, 0),
            }
        })
    }

    /// The int8 values, `[E, out, in]`.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The scales, `[E, out]` f32.
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// Expert `e`'s row scales `[out]` read in place (no copy): the one-row
    /// kernels' per-token path. `None` unless the scales are a contiguous
    /// f32 CPU tensor (as quantisation makes them) and `e` is in range.
    pub(crate) fn row_scales(&self, e: i64) -> Option<&[f32]> {
        let s = &self.scales;
        let (experts, out) = (s.size()[0], s.size()[1]);
        if s.device() != Device::Cpu || s.kind() != Kind::Float || !s.is_contiguous() {
            return None;
        }
        if !(0..experts).contains(&e) {
            return None;
        }
        // SAFETY: a contiguous CPU f32 tensor of `experts * out` elements,
        // owned by `self` (borrowed for the slice's lifetime) and never
        // written after quantisation.
        Some(unsafe {
            std::slice::from_raw_parts(
                (s.data_ptr() as *const f32).add((e * out) as usize),
                out as usize,
            )
        })
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> i64 {
        self.values.size()[0]
    }

    /// Bytes held: `E out in` (int8) + `4 E out` (f32 scales).
    pub fn size_in_bytes(&self) -> i64 {
        tensor_bytes(&self.values) + tensor_bytes(&self.scales)
    }

    /// Back to the bank's layout `[E, in, out]` in `kind`:
    /// `w[e, i, o] = q[e, o, i] s[e, o]`.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        (self.values.to_kind(Kind::Float) * self.scales.unsqueeze(-1))
            .transpose(1, 2)
            .to_kind(kind)
    }

    /// Expert `e`'s product `x W_e ~ (x q_e^T) * s_e`, `x: [..., in]` ->
    /// `[..., out]` in `x`'s dtype, by [`Int8Kernel::Auto`].
    pub fn matmul_expert(&self, e: i64, x: &Tensor) -> Tensor {
        let scales = self.scales.get(e).to_kind(x.kind());
        int8_matmul_auto(x, &self.values.get(e), &scales)
    }

    /// Expert `e`'s `[out, in]` values and its scales in `kind`.
    pub(crate) fn expert(&self, e: i64, kind: Kind) -> (Tensor, Tensor) {
        (self.values.get(e), self.scales.get(e).to_kind(kind))
    }

    /// Every expert's `[out, in]` values and its scales in `kind`.
    pub(crate) fn unbind(&self, kind: Kind) -> (Vec<Tensor>, Vec<Tensor>) {
        (self.values.unbind(0), self.scales.to_kind(kind).unbind(0))
    }
}

/// Bytes of `t`'s elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// The way [`int8_matmul`] computes `x (q * s)^T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Int8Kernel {
    /// [`Int8Kernel::PackMm`] for bf16 activations where it runs (see
    /// [`pack_mm_supported`]), [`Int8Kernel::Dequantize`] elsewhere.
    /// libtorch 2.11's CPU kernel is fast for bf16 only; for f32 and f16 it
    /// runs at scalar speed. One thread, 2-core AMD EPYC (AVX2), one expert's
    /// `[1, 2048] x [2048, 1024]`: bf16 145 us with `_weight_int8pack_mm`
    /// against 789 us dequantising (and 384 us for the float bf16 product
    /// in `nn.Linear`'s layout); f32 2265 us against 451 us; f16 about
    /// equal at one row and 4x slower from 4 rows (`tests/int8.rs`,
    /// `gemv_timing`).
    #[default]
    Auto,
    /// libtorch's CPU kernel `_weight_int8pack_mm(x, q, s)`: reads the int8
    /// weights and converts them in registers (scale applied per weight in
    /// f32, f32 accumulation, one rounding to `x`'s dtype). It has no
    /// backward.
    PackMm,
    /// `(x q^T) * s` with `q` converted to `x`'s dtype (one expert's
    /// matrix at a time); with f16 activations `x (q * s)^T` instead, since
    /// `x q^T` may exceed f16's range. Runs on every device and dtype, with
    /// autograd to `x`.
    Dequantize,
}

/// Whether [`Int8Kernel::PackMm`] runs for `x` and `values`: on CPU, for
/// f32, bf16 or f16 activations of rank 2 that need no gradient, with `in`
/// a multiple of [`PACK_MM_K_MULTIPLE`] and contiguous, 16-byte aligned
/// values. (libtorch 2.11's CPU kernel checks dtypes and shapes but steps
/// through `K` in whole SIMD vectors with aligned loads: with bf16
/// activations it crashes for `K = 12` on an AVX2 machine and for a
/// misaligned activation pointer; [`int8_matmul`] copies a misaligned `x`.)
pub fn pack_mm_supported(x: &Tensor, values: &Tensor) -> bool {
    let k = values.size().last().copied().unwrap_or(0);
    x.device() == Device::Cpu
        && values.device() == Device::Cpu
        && matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        && x.dim() == 2
        && values.dim() == 2
        && values.kind() == Kind::Int8
        && k % PACK_MM_K_MULTIPLE == 0
        && x.size()[1] == k
        && !x.requires_grad()
        && values.is_contiguous()
        && (values.data_ptr() as usize).is_multiple_of(16)
}

/// `_weight_int8pack_mm`'s CPU kernel reads `K` in vectors of 16 (AVX-512)
/// or 8 (AVX2) activations, without a scalar tail.
pub const PACK_MM_K_MULTIPLE: i64 = 16;

/// `y = x (q * s)^T`: `x: [M, in]` in a float dtype, `values: [out, in]`
/// int8, `scales: [out]` (any float dtype; used in `x`'s) -> `[M, out]` in
/// `x`'s dtype. An error when [`Int8Kernel::PackMm`] is asked for where it
/// does not run ([`pack_mm_supported`]) or the shapes do not match.
pub fn int8_matmul(
    x: &Tensor,
    values: &Tensor,
    scales: &Tensor,
    kernel: Int8Kernel,
) -> Result<Tensor> {
    let (vs, xs) = (values.size(), x.size());
    if vs.len() != 2 || xs.len() != 2 || xs[1] != vs[1] || scales.size() != [vs[0]] {
        return Err(MoeError::Shape {
            what: "int8 matmul operands (x, values, scales)".into(),
            expected: format!(
                "[M, {}], [out, {}], [out]",
                xs.last().unwrap_or(&0),
                xs.last().unwrap_or(&0)
            ),
            got: [xs, vs, scales.size()].concat(),
        });
    }
    if values.kind() != Kind::Int8 {
        return Err(MoeError::Kind {
            what: "int8 matmul values".into(),
            expected: "int8".into(),
            got: values.kind(),
        });
    }
    let scales = scales.to_kind(x.kind());
    match kernel {
        Int8Kernel::Auto => Ok(matmul_2d(x, values, &scales)),
        Int8Kernel::PackMm if pack_mm_supported(x, values) => Ok(pack_mm(x, values, &scales)),
        Int8Kernel::PackMm => Err(MoeError::config(format!(
            "_weight_int8pack_mm does not run here (device {:?}, dtype {:?}, in = {}, \
             requires_grad {}): it needs CPU, f32/bf16/f16 activations without gradient \
             and in a multiple of {PACK_MM_K_MULTIPLE}",
            x.device(),
            x.kind(),
            vs[1],
            x.requires_grad()
        ))),
        Int8Kernel::Dequantize => Ok(dequantize_mm(x, values, &scales)),
    }
}

/// [`int8_matmul`] by [`Int8Kernel::Auto`] for `x: [..., in]`, `scales`
/// already in `x`'s dtype.
pub(crate) fn int8_matmul_auto(x: &Tensor, values: &Tensor, scales: &Tensor) -> Tensor {
    if x.dim() == 2 {
        return matmul_2d(x, values, scales);
    }
    let mut size = x.size();
    let k = size.pop().unwrap_or(0);
    let y = matmul_2d(&x.reshape([-1, k]), values, scales);
    size.push(values.size()[0]);
    y.reshape(size.as_slice())
}

/// The automatic choice for a rank-2 `x` ([`Int8Kernel::Auto`]).
fn matmul_2d(x: &Tensor, values: &Tensor, scales: &Tensor) -> Tensor {
    if let Some(y) = moe_core::gemv::int8_linear(x, values, scales, None) {
        return y;
    }
    if x.kind() == Kind::BFloat16 && pack_mm_supported(x, values) {
        pack_mm(x, values, scales)
    } else {
        dequantize_mm(x, values, scales)
    }
}

/// `_weight_int8pack_mm(x, q, s)`, with `x` made contiguous and 32-byte
/// aligned (the kernel's aligned 16-element bf16 loads) if it is not.
fn pack_mm(x: &Tensor, values: &Tensor, scales: &Tensor) -> Tensor {
    let aligned = |t: &Tensor| t.is_contiguous() && (t.data_ptr() as usize).is_multiple_of(32);
    let x = if aligned(x) {
        x.shallow_clone()
    } else {
        // A fresh allocation is 64-byte aligned (c10's CPU allocator).
        let mut fresh = Tensor::empty(x.size(), (x.kind(), x.device()));
        fresh.copy_(x);
        fresh
    };
    x.internal_weight_int8pack_mm(values, &scales.contiguous())
}

/// `(x q^T) * s`, or `x (q * s)^T` in f16 (see [`Int8Kernel::Dequantize`]).
fn dequantize_mm(x: &Tensor, values: &Tensor, scales: &Tensor) -> Tensor {
    let q = values.to_kind(x.kind());
    if x.kind() == Kind::Half {
        x.mm(&(q * scales.unsqueeze(1)).tr())
    } else {
        x.mm(&q.tr()) * scales
    }
}
