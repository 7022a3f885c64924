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
