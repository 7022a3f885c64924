//! The attention kernel shared by [`crate::CausalSelfAttention`],
//! [`crate::GroupedQueryAttention`] and [`crate::MultiHeadLatentAttention`]:
//! causal scaled dot-product attention of `T` new queries over the
//! `S = past + T` keys of the sequence so far.

use moe_core::{
    accumulation_kind, check_float, check_rank, check_same_device, dropout, MoeError, Result,
};
use tch::{Device, Kind, Tensor};

/// `Dropout_p(softmax(s Q K^T + M)) V` for queries at absolute positions
/// `past .. past + T` over keys at positions `0 .. past + T`, with the causal
/// mask `M[i, j] = -inf` for `j > past + i`.
///
/// `q`: `[B, H, T, hs]`; `k`: `[B, H_kv, past + T, hs]`, `v`: `[B, H_kv,
/// past + T, hs_v]` with `H_kv` dividing `H`: query head `h` reads key/value
/// head `h / (H / H_kv)` (grouped-query attention; `H_kv = H` is multi-head
/// attention). Returns `[B, H, T, hs_v]`; `hs_v` may differ from `hs` (MLA),
/// libtorch then takes a kernel that allows it or its math path.
///
/// libtorch's `scaled_dot_product_attention` computes it, with
/// `enable_gqa` when `H_kv < H` (libtorch repeats the key/value heads itself
/// where a kernel needs it), `is_causal` when there is no past, and an
/// explicit boolean mask when new queries follow cached positions (libtorch's
/// `is_causal` aligns the mask to the top-left corner, which is wrong once
/// `S > T`). With dropout on a CPU it runs [`causal_attention_math`] instead.
///
/// `real` (`[B, S]` bool, [`crate::KvCache::key_mask`]) hides left padding:
/// query `i` then sees key `j` when `j <= past + i` and key `j` is real or
/// `j = past + i` (a padded query sees itself, so that no row of weights is
/// empty; what it computes is never read by a real position).
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: i64,
    scale: f64,
    p: f64,
    real: Option<&Tensor>,
) -> Tensor {
    let size = q.size();
    let t = size[size.len() - 2];
    let gqa = size.len() == 4 && k.size()[1] != size[1];
    if let Some(real) = real {
        let q_pos = Tensor::arange_start(past, past + t, (Kind::Int64, q.device())).unsqueeze(1);
        let k_pos = Tensor::arange(past + t, (Kind::Int64, q.device())).unsqueeze(0);
        let visible = real
            .unsqueeze(1)
            .logical_or(&k_pos.eq_tensor(&q_pos))
            .logical_and(&k_pos.le_tensor(&q_pos))
            .unsqueeze(1);
        return Tensor::scaled_dot_product_attention(q, k, v, Some(&visible), p, false, scale, gqa);
    }
    if let Some(out) = one_query_bf16(q, k, v, scale, p, real) {
        return out;
    }
    if p > 0.0 && q.device() == Device::Cpu {
        // libtorch's CPU kernels take the math path whenever there is
        // dropout; spelling that path out lets it use the fast CPU mask.
        return causal_attention_math(q, k, v, past, scale, p);
    }
    // Query i (absolute position past + i) sees keys 0..=past + i.
    let mask = (past > 0 && t > 1).then(|| {
        let q_pos = Tensor::arange_start(past, past + t, (Kind::Int64, q.device()));
        let k_pos = Tensor::arange(past + t, (Kind::Int64, q.device()));
        k_pos.unsqueeze(0).le_tensor(&q_pos.unsqueeze(1))
    });
    Tensor::scaled_dot_product_attention(q, k, v, mask.as_ref(), p, past == 0 && t > 1, scale, gqa)
}

/// One bf16 query per sequence on the CPU (batch-1 decoding), no dropout,
/// no padding: each head's `softmax(s q K^T) V` over the cached keys in f32
/// on the host, one rounding to bf16: a quarter faster than libtorch's CPU
/// SDPA at OLMoE-1B-7B's shape (the ignored test `one_query_timing`), whose
/// set-up costs more than these few multiply-adds per head. `None` where it
/// does not apply.
fn one_query_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    p: f64,
    real: Option<&Tensor>,
) -> Option<Tensor> {
    let size = q.size();
    let on_cpu_bf16 = [q, k, v]
        .iter()
        .all(|t| t.device() == Device::Cpu && t.kind() == Kind::BFloat16 && t.dim() == 4);
    if !on_cpu_bf16 || p > 0.0 || real.is_some() || size[0] != 1 || size[2] != 1 {
        return None;
    }
    let (heads, d) = (size[1] as usize, size[3] as usize);
    let (kv_heads, s, d_v) = (
        k.size()[1] as usize,
        k.size()[2] as usize,
        v.size()[3] as usize,
    );
    if k.size()[3] as usize != d || kv_heads == 0 || heads % kv_heads != 0 {
        return None;
    }
    let qs = Vec::<f32>::try_from(q.reshape([-1]).to_kind(Kind::Float)).ok()?;
    let (k, v) = (k.contiguous(), v.contiguous());
    // SAFETY: contiguous bf16 CPU tensors of these sizes, alive (and not
    // written) for the whole function.
    let (ks, vs) = unsafe {
        (
            std::slice::from_raw_parts(k.data_ptr() as *const u16, kv_heads * s * d),
            std::slice::from_raw_parts(v.data_ptr() as *const u16, kv_heads * s * d_v),
        )
    };
    let widen = |bits: u16| f32::from_bits((bits as u32) << 16);
    let group = heads / kv_heads;
    let mut out = vec![0f32; heads * d_v];
    let mut weights = vec![0f32; s];
    for h in 0..heads {
        let (qh, kv) = (&qs[h * d..(h + 1) * d], h / group);
        for (j, w) in weights.iter_mut().enumerate() {
            let key = &ks[(kv * s + j) * d..(kv * s + j + 1) * d];
            // Eight partial sums, so that the loop vectorises.
            let mut partial = [0f32; 8];
            for (qc, kc) in qh.chunks(8).zip(key.chunks(8)) {
                for (i, (a, b)) in qc.iter().zip(kc).enumerate() {
                    partial[i] += a * widen(*b);
                }
            }
            *w = scale as f32 * partial.iter().sum::<f32>();
        }
        let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for w in weights.iter_mut() {
            *w = (*w - max).exp();
            total += *w;
        }
        let oh = &mut out[h * d_v..(h + 1) * d_v];
        for (j, w) in weights.iter().enumerate() {
            let value = &vs[(kv * s + j) * d_v..(kv * s + j + 1) * d_v];
            let w = w / total;
            oh.iter_mut()
                .zip(value)
                .for_each(|(o, x)| *o += w * widen(*x));
        }
    }
    Some(
        Tensor::from_slice(&out)
            .view([1, heads as i64, 1, d_v as i64])
            .to_kind(Kind::BFloat16),
    )
}

/// What [`causal_attention`] computes, spelled out: what libtorch's
/// `scaled_dot_product_attention` computes on its math path, with the
/// dropout of [`moe_core::dropout`]. Takes all heads (`[B, H, T, hs]`
/// queries, `[B, H_kv, S, hs]` keys and values, whose heads it repeats when
/// `H_kv < H`) or one head (`[B, T, hs]`, `[B, S, hs]`). The softmax runs in
/// f32.
pub(crate) fn causal_attention_math(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: i64,
    scale: f64,
    p: f64,
) -> Tensor {
    let size = q.size();
    let t = size[size.len() - 2];
    let (k, v) = if size.len() == 4 && k.size()[1] != size[1] {
        let groups = size[1] / k.size()[1];
        (repeat_kv(k, groups), repeat_kv(v, groups))
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let future = Tensor::ones([t, past + t], (Kind::Bool, q.device())).triu(past + 1);
    let weights = (q.matmul(&k.transpose(-2, -1)) * scale)
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, accumulation_kind(q.kind()))
        .to_kind(q.kind());
    dropout(&weights, p, true).matmul(&v)
}

/// `[B, H_kv, S, hs] -> [B, H_kv * groups, S, hs]`, each head repeated
/// `groups` times in a row (head `h` of the result is head `h / groups`).
pub(crate) fn repeat_kv(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let (b, h, s, d) = x.size4().expect("[B, H, S, hs]");
    x.unsqueeze(2)
        .expand([b, h, groups, s, d], false)
        .reshape([b, h * groups, s, d])
}

/// The checks every attention layer runs on its input `x`: rank 3 with
/// width `hidden_size`, floating point, on `device`, at least one
/// position, and `past + T <= max_positions`.
pub(crate) fn check_attention_input(
    x: &Tensor,
    hidden_size: i64,
    device: Device,
    past: i64,
    max_positions: i64,
) -> Result<()> {
    let what = "attention input [B, T, C]";
    check_rank(x, what, 3, Some(hidden_size))?;
    check_float(x, "attention input")?;
    check_same_device(x, "attention input", device)?;
    let t = x.size()[1];
    if t == 0 {
        return Err(MoeError::Shape {
            what: what.into(),
            expected: "at least one position".into(),
            got: x.size(),
        });
    }
    if past + t > max_positions {
        return Err(MoeError::SequenceTooLong {
            len: past + t,
            block_size: max_positions,
        });
    }
    Ok(())
}

/// Attention heads `[B, H, T, d]` back to the stream `[B, T, C]` through
/// the output projection, in the heads' dtype.
pub(crate) fn project_heads(heads: &Tensor, o_proj: &tch::nn::Linear) -> Tensor {
    let (b, h, t, d) = heads.size4().expect("[B, H, T, d]");
    let heads = heads.transpose(1, 2).contiguous().view([b, t, h * d]);
    moe_core::linear_in_input_dtype(&heads, o_proj)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-query path against the math path computed in f64 from the
    /// same bf16 values, grouped-query heads included: f32 dot products and
    /// sums of at most `S` terms (`S 2^-24` relative to the sum of
    /// magnitudes, and an `exp` within a few f32 ulps) under one rounding to
    /// bf16 (`2^-8` relative): bounded by `2^-8 |out| + 2^-14 max|v|`.
    #[test]
    fn one_bf16_query_is_the_attention_of_the_math_path() {
        tch::manual_seed(3);
        let bf16 = |shape: &[i64]| {
            Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
        };
        for (heads, kv_heads, past) in [(4, 4, 9), (8, 2, 30), (2, 1, 0)] {
            let q = bf16(&[1, heads, 1, 16]);
            let k = bf16(&[1, kv_heads, past + 1, 16]);
            let v = bf16(&[1, kv_heads, past + 1, 16]);
            let got = causal_attention(&q, &k, &v, past, 0.25, 0.0, None);
            assert_eq!(got.size(), [1, heads, 1, 16]);
            assert_eq!(got.kind(), Kind::BFloat16);
            let d = |t: &Tensor| t.to_kind(Kind::Double);
            let want = causal_attention_math(&d(&q), &d(&k), &d(&v), past, 0.25, 0.0);
            let bound =
                want.abs() * 2f64.powi(-8) + d(&v).abs().max().double_value(&[]) * 2f64.powi(-14);
            let excess = ((d(&got) - &want).abs() - bound).max().double_value(&[]);
            assert!(
                excess <= 0.0,
                "{heads}/{kv_heads} heads, past {past}: {excess:e}"
            );
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p moe-layers-nn --lib one_query_timing -- --ignored --nocapture`:
    /// one bf16 query over 160 cached positions of 16 heads of 128 (an
    /// OLMoE-1B-7B layer mid-decode), this module's path against libtorch's
    /// `scaled_dot_product_attention`.
    #[test]
    #[ignore]
    fn one_query_timing() {
        tch::set_num_threads(2);
        let bf16 = |shape: &[i64]| {
            Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
        };
        let (q, k, v) = (
            bf16(&[1, 16, 1, 128]),
            bf16(&[1, 16, 160, 128]),
            bf16(&[1, 16, 160, 128]),
        );
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..200 {
                let _ = causal_attention(&q, &k, &v, 159, 0.1, 0.0, None);
            }
            let ours = t.elapsed().as_secs_f64() / 200.0;
            let t = std::time::Instant::now();
            for _ in 0..200 {
                let _ = Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    None::<Tensor>,
                    0.0,
                    false,
                    0.1,
                    false,
                );
            }
            let torch = t.elapsed().as_secs_f64() / 200.0;
            println!(
                "ours {:.3} ms, libtorch sdpa {:.3} ms",
                ours * 1e3,
                torch * 1e3
            );
        }
    }
}
