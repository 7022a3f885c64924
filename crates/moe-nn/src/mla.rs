use crate::sdpa::{causal_attention, check_attention_input, project_heads, Visibility};
use crate::{KvCache, MlaConfig, RmsNorm, Rope};
use moe_core::{check_same_device, linear, linear_in_input_dtype, IntoChecked, MoeError, Result};
use tch::{nn, Tensor};

/// Multi-head Latent Attention (MLA), DeepSeek-V2/V3's causal
/// self-attention (DeepSeek-AI 2024, arXiv 2405.04434 §2.1), as Hugging
/// Face's `DeepseekV3Attention` (transformers 5.23, `modeling_deepseek_v3.py`)
/// computes it. With `x: [B, T, C]`, `H` heads, `d_n = qk_nope_head_dim`,
/// `d_r = qk_rope_head_dim`, `d_v = v_head_dim`, `r = kv_lora_rank`:
///
/// - queries: `q = q_b_proj(RMSNorm(q_a_proj(x)))` with `q_lora_rank`, else
///   `q = q_proj(x)`; per head `q = [q_nope (d_n), q_pe (d_r)]`;
/// - keys and values: `[c_kv (r), k_pe (d_r)] = kv_a_proj_with_mqa(x)`,
///   `[k_nope (d_n), v (d_v)] = kv_b_proj(RMSNorm(c_kv))` per head, and one
///   RoPE key `k_pe` shared by all heads;
/// - `Q = [q_nope, RoPE(q_pe)]`, `K = [k_nope, RoPE(k_pe)]` (RoPE over the
///   `d_r` components only, interleaved with `rope_interleave`, tables of
///   [`Rope::with_scaling`]: YaRN for DeepSeek-V3);
/// - `head_h = softmax(s Q_h K_h^T + M) V_h` with the causal mask `M` and
///   `s = (d_n + d_r)^-0.5`, times `mscale^2` with YaRN's `mscale_all_dim`
///   ([`MlaConfig::softmax_scale`]);
/// - `y = o_proj(concat_h(head_h))`.
///
/// Parameters (Hugging Face's names): `p/q_a_proj`, `p/q_a_layernorm`,
/// `p/q_b_proj` with `q_lora_rank`, else `p/q_proj`; `p/kv_a_proj_with_mqa`,
/// `p/kv_a_layernorm`, `p/kv_b_proj`, `p/o_proj`. Biases on `q_a_proj`,
/// `kv_a_proj_with_mqa` and `o_proj` with `attention_bias`, none on the
/// others.
///
/// The KV cache holds, per position, the normalised latent `RMSNorm(c_kv)`
/// and the rotated `k_pe` (`r + d_r` numbers,
/// [`MlaConfig::kv_cache_bytes_per_token`]), as transformers 5.23 caches
/// them; each step recomputes `k_nope` and `v` of every cached position
/// through `kv_b_proj`. Not taken: the absorbed form of the paper (§2.1.2),
/// which folds `kv_b_proj`'s key half into the queries (`q_nope W_UK`,
/// scores against the latent directly) and its value half into `o_proj`, so
/// that decoding never expands the latent; it computes the same function
/// with other rounding.
///
/// The kernel is libtorch's `scaled_dot_product_attention` (it handles
/// `d_v != d_n + d_r`, taking a kernel that allows it or the math path).
/// Computes in `x`'s dtype.
#[derive(Debug)]
pub struct MultiHeadLatentAttention {
    queries: QueryProjection,
    kv_a_proj_with_mqa: nn::Linear,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: nn::Linear,
    o_proj: nn::Linear,
    rope: Rope,
    config: MlaConfig,
}

/// How queries are projected.
#[derive(Debug)]
enum QueryProjection {
    /// `q_proj: C -> H (d_n + d_r)`.
    Full(nn::Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        q_a_proj: nn::Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: nn::Linear,
    },
}

impl MultiHeadLatentAttention {
    /// Creates the layer's parameters under `p` and its RoPE tables (width
    /// `qk_rope_head_dim`) on `p`'s device.
    pub fn new(p: &nn::Path, config: impl IntoChecked<MlaConfig>) -> Result<Self> {
        let config = config.into_checked()?;
        let c = config.hidden_size;
        let h = config.num_attention_heads;
        let r = config.kv_lora_rank;
        let (bias, init, eps) = (config.attention_bias, config.init, config.rms_norm_eps);
        let q_width = h * config.qk_head_dim();
        let queries = match config.q_lora_rank {
            None => QueryProjection::Full(linear(p / "q_proj", c, q_width, false, init)),
            Some(q_rank) => QueryProjection::LowRank {
                q_a_proj: linear(p / "q_a_proj", c, q_rank, bias, init),
                q_a_layernorm: RmsNorm::try_new(&(p / "q_a_layernorm"), q_rank, eps)?,
                q_b_proj: linear(p / "q_b_proj", q_rank, q_width, false, init),
            },
        };
        let kv_width = h * (config.qk_nope_head_dim + config.v_head_dim);
        Ok(MultiHeadLatentAttention {
            queries,
            kv_a_proj_with_mqa: linear(
                p / "kv_a_proj_with_mqa",
                c,
                r + config.qk_rope_head_dim,
                bias,
                init,
            ),
            kv_a_layernorm: RmsNorm::try_new(&(p / "kv_a_layernorm"), r, eps)?,
            kv_b_proj: linear(p / "kv_b_proj", r, kv_width, false, init),
            o_proj: linear(p / "o_proj", h * config.v_head_dim, c, bias, init),
            rope: Rope::with_scaling(
                config.qk_rope_head_dim,
                config.max_position_embeddings,
                config.rope_theta,
                config.rope_scaling.as_ref(),
                p.device(),
            )?,
            config: config.into_inner(),
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MlaConfig {
        &self.config
    }

    /// The layer's rotary embedding tables (width `qk_rope_head_dim`).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// `x`: `[B, T, C]` with `1 <= T <= max_position_embeddings`, positions
    /// `0..T`; returns `[B, T, C]`. `train` enables the attention dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x, 0)?;
        let q = self.queries(x, 0);
        let (latent, k_pe) = self.latent(x, 0);
        let p = if train {
            self.config.attention_dropout
        } else {
            0.0
        };
        Ok(self.attend(&q, &latent, &k_pe, 0, p, None))
    }

    /// Incremental decoding (evaluation mode): `x` holds the `T_new`
    /// positions that follow the `T_past` positions of `cache`, `[B, T_new,
    /// C]`. Their normalised latents and rotated RoPE keys (at positions
    /// `T_past..`) are appended to the cache, the keys and values of all
    /// `T_past + T_new` positions are expanded from it through `kv_b_proj`,
    /// and the new queries attend to them causally. Computes what
    /// [`Self::forward_t`] computes at those positions on the whole sequence
    /// (`T_past + T_new <= max_position_embeddings`).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let past = cache.len();
        self.check_input(x, past)?;
        self.check_cache(x, cache)?;
        let real = cache.key_mask(x.size()[0], past + x.size()[1])?;
        let q = self.queries(x, past);
        let (latent, k_pe) = self.latent(x, past);
        let (latent, k_pe) = cache.append_latent(latent, k_pe)?;
        Ok(self.attend(&q, &latent, &k_pe, past, 0.0, real.as_ref()))
    }

    /// RoPE of `[B, h, T, d_r]` at positions `start..`, in the configured
    /// layout.
    fn rotate(&self, x: &Tensor, start: i64) -> Tensor {
        if self.config.rope_interleave {
            self.rope.rotate_interleaved(x, start)
        } else {
            self.rope.rotate(x, start)
        }
    }

    /// Queries `[B, H, T, d_n + d_r]` of positions `start..`, RoPE on the
    /// last `d_r` components.
    fn queries(&self, x: &Tensor, start: i64) -> Tensor {
        let (b, t, _) = x.size3().expect("checked rank 3");
        let q = match &self.queries {
            QueryProjection::Full(q_proj) => linear_in_input_dtype(x, q_proj),
            QueryProjection::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let compressed = q_a_layernorm.forward(&linear_in_input_dtype(x, q_a_proj));
                linear_in_input_dtype(&compressed, q_b_proj)
            }
        };
        let (h, d_n, d_r) = (
            self.config.num_attention_heads,
            self.config.qk_nope_head_dim,
            self.config.qk_rope_head_dim,
        );
        let q = q.view([b, t, h, d_n + d_r]).transpose(1, 2);
        let q_pe = self.rotate(&q.narrow(-1, d_n, d_r), start);
        Tensor::cat(&[q.narrow(-1, 0, d_n), q_pe], -1)
    }

    /// What the cache holds for positions `start..`: the normalised latent
    /// `[B, T, r]` and the rotated RoPE key `[B, T, d_r]`.
    fn latent(&self, x: &Tensor, start: i64) -> (Tensor, Tensor) {
        let (r, d_r) = (self.config.kv_lora_rank, self.config.qk_rope_head_dim);
        let compressed = linear_in_input_dtype(x, &self.kv_a_proj_with_mqa);
        let latent = self.kv_a_layernorm.forward(&compressed.narrow(-1, 0, r));
        let k_pe = self
            .rotate(&compressed.narrow(-1, r, d_r).unsqueeze(1), start)
            .squeeze_dim(1);
        (latent, k_pe)
    }

    /// Attention of queries `[B, H, T, d_n + d_r]` at positions `past..`
    /// over the keys and values expanded from the latents `[B, S, r]` and
    /// RoPE keys `[B, S, d_r]` of positions `0..S` (`S = past + T`), then
    /// `o_proj`: `[B, T, C]`; `real` hides padded keys.
    fn attend(
        &self,
        q: &Tensor,
        latent: &Tensor,
        k_pe: &Tensor,
        past: i64,
        p: f64,
        real: Option<&Tensor>,
    ) -> Tensor {
        let (b, s, _) = latent.size3().expect("[B, S, r]");
        let (h, d_n, d_r, d_v) = (
            self.config.num_attention_heads,
            self.config.qk_nope_head_dim,
            self.config.qk_rope_head_dim,
            self.config.v_head_dim,
        );
        let kv = linear_in_input_dtype(latent, &self.kv_b_proj)
            .view([b, s, h, d_n + d_v])
            .transpose(1, 2);
        let k_pe = k_pe.unsqueeze(1).expand([b, h, s, d_r], false);
        let k = Tensor::cat(&[kv.narrow(-1, 0, d_n), k_pe], -1);
        let v = kv.narrow(-1, d_n, d_v);
        let visibility = Visibility {
            real,
            ..Visibility::default()
        };
        let heads = causal_attention(q, &k, &v, past, self.config.softmax_scale(), p, visibility);
        project_heads(&heads, &self.o_proj)
    }

    /// See [`check_attention_input`].
    fn check_input(&self, x: &Tensor, past: i64) -> Result<()> {
        let c = &self.config;
        let device = self.o_proj.ws.device();
        check_attention_input(x, c.hidden_size, device, past, c.max_position_embeddings)
    }

    /// That `cache` holds latents this layer could have written for `x`'s
    /// batch (kind, batch size, widths, dtype, device).
    fn check_cache(&self, x: &Tensor, cache: &KvCache) -> Result<()> {
        cache.check_holds_latent()?;
        let Some((latent, k_pe)) = cache.latent() else {
            return Ok(());
        };
        let b = x.size()[0];
        if latent.size()[0] != b {
            return Err(MoeError::Shape {
                what: "attention input with a KV cache".into(),
                expected: format!("batch size {}, the cached sequences'", latent.size()[0]),
                got: x.size(),
            });
        }
        let (r, d_r) = (self.config.kv_lora_rank, self.config.qk_rope_head_dim);
        if latent.size()[2] != r || k_pe.size()[2] != d_r {
            return Err(MoeError::Shape {
                what: "cached latents [B, T_past, kv_lora_rank]".into(),
                expected: format!(
                    "kv_lora_rank {r} and qk_rope_head_dim {d_r} (this layer's), RoPE keys of \
                     width {}",
                    k_pe.size()[2]
                ),
                got: latent.size(),
            });
        }
        if latent.kind() != x.kind() {
            return Err(MoeError::Kind {
                what: "attention input with a KV cache".into(),
                expected: format!("{:?}, the cached latents' dtype", latent.kind()),
                got: x.kind(),
            });
        }
        check_same_device(latent, "cached latents", x.device())
    }
}
