use crate::norm::rms_normalize;
use crate::sdpa::{causal_attention, check_attention_input, project_heads, Visibility};
use crate::{GqaConfig, KvCache, LocalizedFiltering, QkNorm, RmsNorm, Rope};
use moe_core::profile::span;
use moe_core::{check_same_device, linear, linear_in_input_dtype, IntoChecked, MoeError, Result};
use tch::{nn, Kind, Tensor};

/// Grouped-query causal self-attention with rotary position embeddings, the
/// attention of Llama-style decoders (Mixtral, Qwen2-MoE, DeepSeek-V3 without
/// MLA, OLMoE, Yuan 2.0; Hugging Face's `LlamaAttention` in
/// `modeling_llama.py`; DeepSeek's own attention is
/// [`crate::MultiHeadLatentAttention`]):
///
/// `Q = RoPE(x W_q + b_q)`, `K = RoPE(x W_k + b_k)`, `V = x W_v + b_v`,
/// `head_h = softmax(Q_h K_g^T / sqrt(head_dim) + M) V_g` with
/// `g = h / (H / H_kv)` and `M[i, j] = -inf` for `j > i`,
/// `y = concat_h(head_h) W_o`
///
/// (grouped-query attention: Ainslie et al. 2023, arXiv 2305.13245, `H_kv`
/// key/value heads each shared by `H / H_kv` query heads; RoPE: Su et al.
/// 2021, arXiv 2104.09864; with [`GqaConfig::rope_scaling`], the tables of
/// [`Rope::with_scaling`]). Options: biases on the q, k, v projections
/// (Qwen2), QK-norm before RoPE ([`QkNorm`]: OLMoE's over the projections,
/// Qwen3's per head), RoPE on part of each head
/// ([`GqaConfig::partial_rotary_factor`], GLM-4.5), Yuan 2.0's localized
/// filtering, which computes `Q` and `K` from `LF(x)`
/// ([`LocalizedFiltering`]) and `V` from `x`, a sliding window
/// ([`GqaConfig::sliding_window`]: `M[i, j] = -inf` also for `i - j >= W`)
/// learned attention sinks ([`GqaConfig::attention_sinks`], gpt-oss:
/// `softmax([Q_h K_g^T / sqrt(head_dim) + M, s_h])` without its last column),
/// and Llama 4's options: RoPE on adjacent pairs
/// ([`GqaConfig::rope_interleave`]), the weightless L2 QK-norm after RoPE
/// ([`QkNorm::L2`]), chunked attention ([`GqaConfig::attention_chunk_size`]:
/// `M[i, j] = -inf` also across chunks), and layers without RoPE
/// ([`GqaConfig::use_rope`]) whose queries are temperature-tuned
/// ([`GqaConfig::attn_temperature_tuning`]: `Q_i <- tau(i) Q_i`).
///
/// Parameters: `p/q_proj`, `p/k_proj`, `p/v_proj`, `p/o_proj` (`nn::Linear`,
/// `o_proj` with a bias only with [`GqaConfig::o_proj_bias`]), `p/q_norm/weight`, `p/k_norm/weight` with
/// QK-norm, `p/lf_gate/...` with localized filtering, `p/sinks` (`[H]`,
/// zeros at first) with attention sinks.
///
/// The kernel is libtorch's `scaled_dot_product_attention` with
/// `enable_gqa` (the key/value heads are not copied; libtorch repeats them
/// only where a kernel needs it). Training with dropout on a CPU spells the
/// math path out and repeats them there. Computes in `x`'s dtype.
#[derive(Debug)]
pub struct GroupedQueryAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    /// `(q_norm, k_norm)` with QK-norm.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    lf_gate: Option<LocalizedFiltering>,
    /// `s_h`, `[H]`, with attention sinks.
    sinks: Option<Tensor>,
    rope: Rope,
    config: GqaConfig,
}

impl GroupedQueryAttention {
    /// Creates the layer's parameters under `p` and its RoPE tables on
    /// `p`'s device.
    pub fn new(p: &nn::Path, config: impl IntoChecked<GqaConfig>) -> Result<Self> {
        let config = config.into_checked()?;
        let c = config.hidden_size;
        let d = config.head_dim();
        let (q_width, kv_width) = (
            config.num_attention_heads * d,
            config.num_key_value_heads * d,
        );
        let (bias, init) = (config.attention_bias, config.init);
        let eps = config.rms_norm_eps;
        let qk_norm = match config.qk_norm {
            QkNorm::None | QkNorm::L2 => None,
            QkNorm::Projection => Some((
                RmsNorm::try_new(&(p / "q_norm"), q_width, eps)?,
                RmsNorm::try_new(&(p / "k_norm"), kv_width, eps)?,
            )),
            QkNorm::Head => Some((
                RmsNorm::try_new(&(p / "q_norm"), d, eps)?,
                RmsNorm::try_new(&(p / "k_norm"), d, eps)?,
            )),
        };
        let lf_gate = config
            .localized_filtering
            .then(|| LocalizedFiltering::new(&(p / "lf_gate"), c, eps, init))
            .transpose()?;
        Ok(GroupedQueryAttention {
            q_proj: linear(p / "q_proj", c, q_width, bias, init),
            k_proj: linear(p / "k_proj", c, kv_width, bias, init),
            v_proj: linear(p / "v_proj", c, kv_width, bias, init),
            o_proj: linear(p / "o_proj", q_width, c, config.o_proj_bias, init),
            qk_norm,
            lf_gate,
            sinks: config
                .attention_sinks
                .then(|| p.var("sinks", &[config.num_attention_heads], nn::Init::Const(0.0))),
            rope: Rope::with_scaling(
                config.rotary_dim(),
                config.max_position_embeddings,
                config.rope_theta,
                config.rope_scaling.as_ref(),
                p.device(),
            )?,
            config: config.into_inner(),
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &GqaConfig {
        &self.config
    }

    /// The layer's rotary embedding tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// `x`: `[B, T, C]` with `1 <= T <= max_position_embeddings`, positions
    /// `0..T`; returns `[B, T, C]`. `train` enables the attention dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x, 0)?;
        let qk_input = match &self.lf_gate {
            Some(lf) => lf.forward_with_state(x, None).0,
            None => x.shallow_clone(),
        };
        let (q, k, v) = self.project(x, &qk_input, 0, None);
        let p = if train {
            self.config.attention_dropout
        } else {
            0.0
        };
        let visibility = self.visibility(None);
        let heads = causal_attention(&q, &k, &v, 0, self.config.scale_factor(), p, visibility);
        Ok(self.output(&heads))
    }

    /// Incremental decoding (evaluation mode): `x` holds the `T_new` positions
    /// that follow the `T_past` positions of `cache`, `[B, T_new, C]`. They
    /// are rotated at their absolute positions `T_past..`, attend to the
    /// cached keys and values and to each other causally, and their keys
    /// (after RoPE) and values are appended to the cache, with the localized
    /// filter's state. Computes what [`Self::forward_t`] computes at those
    /// positions on the whole sequence (`T_past + T_new <=
    /// max_position_embeddings`).
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let past = cache.len();
        self.check_input(x, past)?;
        self.check_cache(x, cache)?;
        if self.lf_gate.is_some() && cache.padding().is_some() {
            return Err(MoeError::config(
                "localized filtering (Yuan 2.0) cannot take a left-padded batch: its \
                 convolutions would read the padding before a shorter prompt (batch prompts of \
                 equal length, or generate them one by one)",
            ));
        }
        let real = cache.key_mask(x.size()[0], past + x.size()[1])?;
        let qk_input = match &self.lf_gate {
            Some(lf) => {
                let (filtered, state) = lf.forward_with_state(x, cache.lf_state());
                cache.set_lf_state(state);
                filtered
            }
            None => x.shallow_clone(),
        };
        let (q, k, v) = self.project(x, &qk_input, past, real.as_ref());
        let (keys, values) = span("kv_cache", || cache.append(k, v))?;
        let scale = self.config.scale_factor();
        let visibility = self.visibility(real.as_ref());
        let heads = span("sdpa", || {
            causal_attention(&q, &keys, &values, past, scale, 0.0, visibility)
        });
        Ok(self.output(&heads))
    }

    /// Queries `[B, H, T, d]`, keys and values `[B, H_kv, T, d]` of the
    /// rows `start..start + T` of the cache: projections, QK-norm, RoPE (at
    /// `start..`, which only differences of positions reach), Llama 4's L2
    /// norm after it, and the temperature of the queries at their positions
    /// counted from each row's first real key (`real`, `[B, start + T]`, with
    /// left padding).
    fn project(
        &self,
        x: &Tensor,
        qk_input: &Tensor,
        start: i64,
        real: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("checked rank 3");
        let d = self.config.head_dim();
        let (mut q, mut k, v) = span("projections", || {
            (
                linear_in_input_dtype(qk_input, &self.q_proj),
                linear_in_input_dtype(qk_input, &self.k_proj),
                linear_in_input_dtype(x, &self.v_proj),
            )
        });
        if let (QkNorm::Projection, Some((q_norm, k_norm))) = (self.config.qk_norm, &self.qk_norm) {
            q = q_norm.forward(&q);
            k = k_norm.forward(&k);
        }
        let heads = |y: &Tensor, n: i64| y.view([b, t, n, d]).transpose(1, 2);
        let mut q = heads(&q, self.config.num_attention_heads);
        let mut k = heads(&k, self.config.num_key_value_heads);
        let v = heads(&v, self.config.num_key_value_heads);
        if let (QkNorm::Head, Some((q_norm, k_norm))) = (self.config.qk_norm, &self.qk_norm) {
            q = q_norm.forward(&q);
            k = k_norm.forward(&k);
        }
        if self.config.use_rope {
            (q, k) = span("rope", || (self.rotate(&q, start), self.rotate(&k, start)));
            if self.config.qk_norm == QkNorm::L2 {
                let eps = self.config.rms_norm_eps;
                (q, k) = (rms_normalize(&q, eps), rms_normalize(&k, eps));
            }
        }
        if let Some(tuning) = &self.config.attn_temperature_tuning {
            let positions = match real {
                Some(real) => (real.cumsum(1, Kind::Int64) - 1).narrow(1, start, t),
                None => Tensor::arange_start(start, start + t, (Kind::Int64, x.device())),
            };
            // [T] -> [1, 1, T, 1]; [B, T] -> [B, 1, T, 1].
            let scales = tuning.scales(&positions).unsqueeze(-1).unsqueeze(-3);
            q = (q * scales).to_kind(x.kind());
        }
        (q, k, v)
    }

    /// RoPE on `[B, H, T, d]` heads: all `d` dimensions, or with a partial
    /// factor the first `rotary_dim`, the rest passed through.
    fn rotate(&self, x: &Tensor, start: i64) -> Tensor {
        let (d, r) = (self.config.head_dim(), self.config.rotary_dim());
        if self.config.rope_interleave {
            return self.rope.rotate_interleaved(x, start);
        }
        if r == d {
            return self.rope.rotate(x, start);
        }
        let turned = self.rope.rotate(&x.narrow(-1, 0, r), start);
        Tensor::cat(&[turned, x.narrow(-1, r, d - r)], -1)
    }

    /// The padding mask `real`, the window and the sinks of this layer.
    fn visibility<'a>(&'a self, real: Option<&'a Tensor>) -> Visibility<'a> {
        Visibility {
            real,
            window: self.config.sliding_window,
            chunk: self.config.attention_chunk_size,
            sinks: self.sinks.as_ref(),
        }
    }

    /// `[B, H, T, d]` heads -> `[B, T, C]` through `o_proj`.
    fn output(&self, heads: &Tensor) -> Tensor {
        span("projections", || project_heads(heads, &self.o_proj))
    }

    /// See [`check_attention_input`].
    fn check_input(&self, x: &Tensor, past: i64) -> Result<()> {
        let c = &self.config;
        let device = self.q_proj.ws.device();
        check_attention_input(x, c.hidden_size, device, past, c.max_position_embeddings)
    }

    /// That `cache` holds keys this layer could have written for `x`'s batch
    /// (batch size, heads, head width, dtype, device, filter state).
    fn check_cache(&self, x: &Tensor, cache: &KvCache) -> Result<()> {
        cache.check_holds_keys_values()?;
        let Some(keys) = cache.keys() else {
            return Ok(());
        };
        let b = x.size()[0];
        if keys.size()[0] != b {
            return Err(MoeError::Shape {
                what: "attention input with a KV cache".into(),
                expected: format!("batch size {}, the cached sequences'", keys.size()[0]),
                got: x.size(),
            });
        }
        let (hkv, d) = (self.config.num_key_value_heads, self.config.head_dim());
        let size = keys.size();
        if size[1] != hkv || size[3] != d {
            return Err(MoeError::Shape {
                what: "cached keys [B, H_kv, T_past, head_dim]".into(),
                expected: format!("{hkv} key/value heads of width {d} (this layer's)"),
                got: size,
            });
        }
        if keys.kind() != x.kind() {
            return Err(MoeError::Kind {
                what: "attention input with a KV cache".into(),
                expected: format!("{:?}, the cached keys' dtype", keys.kind()),
                got: x.kind(),
            });
        }
        check_same_device(keys, "cached keys", x.device())?;
        if self.lf_gate.is_some() {
            let expected = [b, self.config.hidden_size];
            let ok = cache
                .lf_state()
                .is_some_and(|s| s.last_input.size() == expected);
            if !ok {
                return Err(MoeError::config(
                    "the KV cache was not filled by a layer with localized filtering of this width",
                ));
            }
        }
        Ok(())
    }
}
