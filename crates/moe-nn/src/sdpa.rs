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
/// `visibility` narrows what a query sees and adds to its softmax:
///
/// - `real` (`[B, S]` bool, [`crate::KvCache::key_mask`]) hides left
///   padding: query `i` then sees key `j` when `j <= past + i` and key `j`
///   is real or `j = past + i` (a padded query sees itself, so that no row
///   of weights is empty; what it computes is never read by a real
///   position);
/// - a sliding window `W` hides keys `j` with `past + i - j >= W`
///   (libtorch's kernel under that explicit mask; a single unpadded query
///   reads the last `W` keys alone);
/// - chunks of `c` positions hide keys outside the query's chunk,
///   `floor(m_j / c) != floor(m_i / c)` with `m` the position counted from
///   the row's first real key (a single unpadded query reads its chunk's
///   keys alone);
/// - attention sinks add a logit per head to the softmax's denominator
///   (the math path: libtorch's kernels have no sink; the softmax in f32
///   for bf16/f16 inputs).
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: i64,
    scale: f64,
    p: f64,
    visibility: Visibility<'_>,
) -> Tensor {
    let size = q.size();
    let t = size[size.len() - 2];
    let gqa = size.len() == 4 && k.size()[1] != size[1];
    let Visibility {
        real,
        window,
        chunk,
        sinks,
    } = visibility;
    // A window or chunk at least as long as the sequence never hides a key.
    let window = window.filter(|&w| w < past + t);
    let chunk = chunk.filter(|&c| c < past + t);
    // One query per unpadded row (decoding): its window, or its chunk so
    // far, is the last keys, so the others are not even read.
    let first_seen = match (window, chunk) {
        (Some(w), _) => Some(past + 1 - w),
        (None, Some(c)) => Some(past / c * c),
        (None, None) => None,
    };
    if let (Some(first), None, 1) = (first_seen, real, t) {
        let seen = past + 1 - first;
        let (k, v) = (k.narrow(-2, first, seen), v.narrow(-2, first, seen));
        let visibility = Visibility {
            sinks,
            ..Visibility::default()
        };
        return causal_attention(q, &k, &v, seen - 1, scale, p, visibility);
    }
    if real.is_some() || window.is_some() || chunk.is_some() || sinks.is_some() {
        let q_pos = Tensor::arange_start(past, past + t, (Kind::Int64, q.device())).unsqueeze(1);
        let k_pos = Tensor::arange(past + t, (Kind::Int64, q.device())).unsqueeze(0);
        let mut visible = k_pos.le_tensor(&q_pos);
        if let Some(w) = window {
            visible = visible.logical_and(&(&q_pos - &k_pos).lt(w));
        }
        if let Some(real) = real {
            visible = real
                .unsqueeze(1)
                .logical_or(&k_pos.eq_tensor(&q_pos))
                .logical_and(&visible);
        }
        if let Some(c) = chunk {
            // Chunk of every key: [S] unpadded, [B, S] from each row's first
            // real key (padding falls in chunk -1 with its own query).
            let key_chunk = match real {
                Some(real) => real.cumsum(-1, Kind::Int64) - 1,
                None => k_pos.squeeze_dim(0),
            }
            .floor_divide_scalar(c);
            let query_chunk = key_chunk.narrow(-1, past, t);
            visible = visible.logical_and(
                &key_chunk
                    .unsqueeze(-2)
                    .eq_tensor(&query_chunk.unsqueeze(-1)),
            );
        }
        if real.is_some() {
            visible = visible.unsqueeze(1);
        }
        return match sinks {
            None => {
                Tensor::scaled_dot_product_attention(q, k, v, Some(&visible), p, false, scale, gqa)
            }
            Some(sinks) => attention_with_sinks(q, k, v, &visible, sinks, scale, p),
        };
    }
    if let Some(out) = one_query_bf16(q, k, v, scale, p) {
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

/// Which keys a query sees beyond the causal rule, and what else enters
/// its softmax ([`causal_attention`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Visibility<'a> {
    /// Left padding: `[B, S]` bool, true at real keys.
    pub real: Option<&'a Tensor>,
    /// Sliding window `W`: query `i` sees key `j` only when `i - j < W`
    /// (the `W` latest positions, itself included; Mistral's and
    /// transformers' `sliding_window`).
    pub window: Option<i64>,
    /// Chunked attention of `c` positions: query `i` sees key `j` only in
    /// its own chunk, `floor(m_i / c) = floor(m_j / c)` (Llama 4's
    /// `attention_chunk_size`), positions `m` counted from the row's first
    /// real key.
    pub chunk: Option<i64>,
    /// Learned attention sinks `s_h` (`[H]`): one more logit per head in
    /// the softmax's denominator, whose weight is dropped (gpt-oss;
    /// Xiao et al. 2023, arXiv 2309.17453):
    /// `w_ij = exp(l_ij) / (exp(s_h) + sum_j' exp(l_ij'))`.
    pub sinks: Option<&'a Tensor>,
}

/// `Dropout_p(softmax([s Q K^T + M, s_h])[..., :S]) V`: the keys `visible`
/// may see (`[T, S]` or `[B, 1, T, S]`), each head's sink logit `s_h`
/// (`sinks: [H]`) as one more column of the softmax, dropped after it.
/// Key/value heads are repeated for grouped-query attention.
fn attention_with_sinks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Tensor,
    sinks: &Tensor,
    scale: f64,
    p: f64,
) -> Tensor {
    let (b, h, t, _) = q.size4().expect("[B, H, T, hs]");
    let groups = h / k.size()[1];
    let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
    let logits = (q.matmul(&k.transpose(-2, -1)) * scale)
        .masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
    let sink = sinks
        .to_kind(q.kind())
        .view([1, h, 1, 1])
        .expand([b, h, t, 1], false);
    let s = logits.size()[3];
    let weights = Tensor::cat(&[logits, sink], -1)
        .softmax(-1, accumulation_kind(q.kind()))
        .narrow(-1, 0, s)
        .to_kind(q.kind());
    dropout(&weights, p, true).matmul(&v)
}

/// One bf16 query per sequence on the CPU (batch-1 decoding), no dropout,
/// no padding, window or sink (the caller's other paths): each head's `softmax(s q K^T) V` over the cached keys in f32
/// on the host, one rounding to bf16: a quarter faster than libtorch's CPU
/// SDPA at OLMoE-1B-7B's shape (the ignored test `one_query_timing`), whose
/// set-up costs more than these few multiply-adds per head. `None` where it
/// does not apply.
fn one_query_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, p: f64) -> Option<Tensor> {
    let size = q.size();
    let on_cpu_bf16 = [q, k, v]
        .iter()
        .all(|t| t.device() == Device::Cpu && t.kind() == Kind::BFloat16 && t.dim() == 4);
    if !on_cpu_bf16 || p > 0.0 || size[0] != 1 || size[2] != 1 {
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

    /// The window, the chunks and the sinks against the formula written out per query
    /// in f64: `w_j = exp(l_j) / (exp(s_h) + sum_{j visible} exp(l_j))` over
    /// the keys `j <= past + i` with `past + i - j < W`, `out = sum_j w_j v_j`;
    /// grouped-query heads, cached positions and a padded sequence included.
    /// Both sides compute in f64: the difference is rounding, `1e-12`.
    #[test]
    fn windows_chunks_and_sinks_are_the_written_out_softmax() {
        tch::manual_seed(5);
        let f64s = |shape: &[i64]| Tensor::randn(shape, (Kind::Double, Device::Cpu));
        let (b, h, h_kv, d) = (2, 4, 2, 8);
        for (past, t, window, chunk, with_sinks, padded) in [
            (0, 7, Some(3), None, false, false),
            (0, 7, Some(3), None, true, false),
            (5, 3, Some(4), None, true, false),
            (0, 6, None, None, true, false),
            (2, 4, Some(2), None, true, true),
            (4, 1, Some(1), None, false, false),
            // Decoding: one query, the window's keys alone.
            (9, 1, Some(3), None, true, false),
            (9, 1, Some(3), None, false, true),
            // Chunks of 3 (Llama 4), counted from the first real key.
            (0, 8, None, Some(3), false, false),
            (4, 4, None, Some(3), true, false),
            (0, 8, None, Some(3), false, true),
            (3, 5, None, Some(2), true, true),
            (9, 1, None, Some(4), false, false),
            (8, 1, None, Some(4), true, false),
            (9, 1, None, Some(4), false, true),
        ] {
            let s = past + t;
            let (q, k, v) = (
                f64s(&[b, h, t, d]),
                f64s(&[b, h_kv, s, d]),
                f64s(&[b, h_kv, s, d]),
            );
            let sinks = f64s(&[h]);
            // Sequence 1 padded on the left over its first two positions.
            let real = Tensor::ones([b, s], (Kind::Bool, Device::Cpu));
            if padded {
                let _ = real.get(1).narrow(0, 0, 2).fill_(0);
            }
            let visibility = Visibility {
                real: padded.then_some(&real),
                window,
                chunk,
                sinks: with_sinks.then_some(&sinks),
            };
            let got = causal_attention(&q, &k, &v, past, 0.3, 0.0, visibility);
            let want = Tensor::zeros([b, h, t, d], (Kind::Double, Device::Cpu));
            for bi in 0..b {
                for hi in 0..h {
                    let g = hi / (h / h_kv);
                    for i in 0..t {
                        let pos = past + i;
                        // Positions from the row's first real key.
                        let first_real = if padded && bi == 1 { 2 } else { 0 };
                        let chunk_of = |j: i64, c: i64| (j - first_real).div_euclid(c);
                        let seen: Vec<i64> = (0..=pos)
                            .filter(|&j| window.is_none_or(|w| pos - j < w))
                            .filter(|&j| chunk.is_none_or(|c| chunk_of(j, c) == chunk_of(pos, c)))
                            .filter(|&j| !padded || j == pos || real.int64_value(&[bi, j]) != 0)
                            .collect();
                        let logits: Vec<f64> = seen
                            .iter()
                            .map(|&j| {
                                0.3 * q
                                    .get(bi)
                                    .get(hi)
                                    .get(i)
                                    .dot(&k.get(bi).get(g).get(j))
                                    .double_value(&[])
                            })
                            .collect();
                        let sink = if with_sinks {
                            sinks.double_value(&[hi]).exp()
                        } else {
                            0.0
                        };
                        let total: f64 = sink + logits.iter().map(|l| l.exp()).sum::<f64>();
                        let out = seen.iter().zip(&logits).fold(
                            Tensor::zeros([d], (Kind::Double, Device::Cpu)),
                            |acc, (&j, l)| acc + v.get(bi).get(g).get(j) * (l.exp() / total),
                        );
                        want.get(bi).get(hi).get(i).copy_(&out);
                    }
                }
            }
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(
                diff < 1e-12,
                "past {past}, T {t}, window {window:?}, sinks {with_sinks}, padded {padded}: {diff:e}"
            );
        }
    }

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
            let got = causal_attention(&q, &k, &v, past, 0.25, 0.0, Visibility::default());
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
                let _ = causal_attention(&q, &k, &v, 159, 0.1, 0.0, Visibility::default());
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
