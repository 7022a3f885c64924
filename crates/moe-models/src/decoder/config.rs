use moe_block::{SharedExperts, SparseMoeConfig};
use moe_core::{MoeError, Precision, Result, WeightInit};
use moe_dispatch::{DispatchKind, DispatchSpec};
use moe_experts::Activation;
use moe_nn::{GqaConfig, MlaConfig, QkNorm, RopeScaling, TemperatureTuning};
use moe_routers::{BalanceLossConfig, Gate, RouterConfig, WeightsOn};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Hyper-parameters of the decoder family ([`super::DecoderModel`]):
/// Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE, LLaMA-MoE and
/// Yuan 2.0-M32 are settings of it.
///
/// Field names are Hugging Face's (`config.json` of `MixtralConfig`,
/// `Qwen2MoeConfig`, `DeepseekV3Config`, `OlmoeConfig`); where the families
/// name a field differently, Mixtral's name is used (`num_local_experts`,
/// which DeepSeek calls `n_routed_experts` and Qwen2-MoE/OLMoE
/// `num_experts`; a reader of their checkpoints maps them). What Hugging Face spreads over flat
/// keys that only make sense for one router (`norm_topk_prob`, `n_group`,
/// `topk_group`, `routed_scaling_factor`, `scoring_func`) lives here in one
/// place, the nested [`RouterConfig`] whose [`Gate`] variant carries its own
/// settings. Fields that Hugging Face does not have are ours:
/// `qk_norm`, `localized_filtering`, `attention_sinks`, `o_proj_bias`,
/// `expert_activation`, `expert_bias`, `router`, `dispatch`, `init`,
/// `precision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Vocabulary size `V`.
    pub vocab_size: i64,
    /// Model width `d`.
    pub hidden_size: i64,
    /// Hidden width of the dense SwiGLU MLPs (LLaMA, the first
    /// `first_k_dense_replace` layers of DeepSeek), and of each expert when
    /// `moe_intermediate_size` is not set (Mixtral, OLMoE).
    pub intermediate_size: i64,
    /// Hidden width of each routed expert (DeepSeek, Qwen2-MoE).
    pub moe_intermediate_size: Option<i64>,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: i64,
    /// Width of one head; `hidden_size / num_attention_heads` when not set.
    pub head_dim: Option<i64>,
    /// Longest sequence (the RoPE table's length).
    pub max_position_embeddings: i64,
    /// RoPE base `theta`.
    pub rope_theta: f64,
    /// RoPE scaling (`linear`, `dynamic`, `yarn`, `llama3`); `None`: plain.
    #[serde(deserialize_with = "RopeScaling::deserialize_option")]
    pub rope_scaling: Option<RopeScaling>,
    /// The share of each head's dimensions RoPE turns (GLM-4.5: 0.5; see
    /// [`GqaConfig::partial_rotary_factor`]); 1 with latent attention.
    pub partial_rotary_factor: f64,
    /// DeepSeek-V2/V3's Multi-head Latent Attention instead of grouped-query
    /// attention: its low-rank sizes (Hugging Face's flat `q_lora_rank`,
    /// `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`,
    /// `rope_interleave`, gathered here so that they are set together).
    pub latent_attention: Option<LatentAttention>,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Bias on the q, k, v projections (Qwen2).
    pub attention_bias: bool,
    /// Bias on the attention's output projection (gpt-oss's
    /// `attention_bias` covers q, k, v and o).
    pub o_proj_bias: bool,
    /// Dropout on the attention weights in training.
    pub attention_dropout: f64,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// RMSNorm on queries and keys (OLMoE: over the whole projection).
    pub qk_norm: QkNorm,
    /// Yuan 2.0's localized filtering of the query/key stream.
    pub localized_filtering: bool,
    /// The window of the sliding-window layers (Mixtral, Qwen, gpt-oss): a
    /// query there sees the `sliding_window` latest positions, itself
    /// included. `None`: every layer attends to the whole prefix.
    pub sliding_window: Option<i64>,
    /// Each layer's attention, `full_attention` or `sliding_attention`
    /// (transformers 5's `layer_types`); empty: every layer slides when
    /// `sliding_window` is set (Mixtral's, Qwen3-MoE's), else none does.
    pub layer_types: Vec<LayerType>,
    /// Learned attention sinks in every layer (gpt-oss; [`GqaConfig::attention_sinks`]).
    pub attention_sinks: bool,
    /// The chunk of the `chunked_attention` layers (Llama 4;
    /// [`GqaConfig::attention_chunk_size`]): a query there sees the earlier
    /// positions of its own chunk of this many.
    pub attention_chunk_size: Option<i64>,
    /// Layers without RoPE (Llama 4's NoPE layers, every fourth; Hugging
    /// Face's `no_rope_layers` flags are 0 at these), by index.
    pub nope_layers: Vec<i64>,
    /// Llama 4's temperature tuning of the queries in the NoPE layers
    /// ([`TemperatureTuning`]).
    pub attn_temperature_tuning: Option<TemperatureTuning>,
    /// Grouped-query attention turns adjacent pairs of a head's dimensions
    /// (Llama 4; [`GqaConfig::rope_interleave`]). Latent attention has its
    /// own ([`LatentAttention::rope_interleave`]).
    pub rope_interleave: bool,
    /// The routed (and shared) experts' non-linearity: SwiGLU, or gpt-oss's
    /// clamped SwiGLU (its `swiglu_alpha` and `swiglu_limit`).
    pub expert_activation: Activation,
    /// Biases on the experts' projections (gpt-oss).
    pub expert_bias: bool,
    /// Routed experts `E` (0: every layer is dense, as LLaMA).
    pub num_local_experts: i64,
    /// Experts per token `k`.
    pub num_experts_per_tok: i64,
    /// DeepSeek's shared experts: this many experts of the routed width that
    /// every token passes through (held as one expert of `n` times the width).
    pub n_shared_experts: i64,
    /// Qwen2-MoE's shared expert: one expert of this width whose output is
    /// gated by `sigmoid(x w_g)`.
    pub shared_expert_intermediate_size: Option<i64>,
    /// DeepSeek: the first this many layers have a dense MLP instead of MoE.
    pub first_k_dense_replace: i64,
    /// Of the layers after the dense prefix, every this-many-th is MoE,
    /// the others dense: layer `i` is MoE when `(i + 1) % step == 0`
    /// (Llama 4's `interleave_moe_layer_step`, Qwen's `decoder_sparse_step`;
    /// 1: all of them).
    pub interleave_moe_layer_step: i64,
    /// Gate, gate bias, scaling factor, capacity.
    pub router: RouterConfig,
    /// Switch load-balance coefficient (Mixtral's `router_aux_loss_coef`,
    /// 0.02 in Mixtral; 0: none).
    pub router_aux_loss_coef: f64,
    /// How tokens reach their experts.
    pub dispatch: DispatchKind,
    /// Initialisation of the linear layers (embeddings: N(0, 0.02^2)).
    pub init: WeightInit,
    /// Compute dtype of attention and MLPs; parameters stay f32.
    pub precision: Precision,
}

impl Default for DecoderConfig {
    /// A small Mixtral: 8 layers of width 128, 8 query and 4 key/value
    /// heads, 8 SwiGLU experts of width 368 with top-2 softmax routing,
    /// context 32 (makeMoE's), about makeMoE's active parameters (2.67 M).
    fn default() -> Self {
        DecoderConfig {
            vocab_size: 65,
            hidden_size: 128,
            intermediate_size: 368,
            moe_intermediate_size: None,
            num_hidden_layers: 8,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: None,
            max_position_embeddings: 32,
            rope_theta: 10_000.0,
            rope_scaling: None,
            partial_rotary_factor: 1.0,
            latent_attention: None,
            rms_norm_eps: 1e-5,
            attention_bias: false,
            o_proj_bias: false,
            attention_dropout: 0.0,
            tie_word_embeddings: true,
            qk_norm: QkNorm::None,
            localized_filtering: false,
            sliding_window: None,
            layer_types: Vec::new(),
            attention_sinks: false,
            attention_chunk_size: None,
            nope_layers: Vec::new(),
            attn_temperature_tuning: None,
            rope_interleave: false,
            expert_activation: Activation::SwiGlu,
            expert_bias: false,
            num_local_experts: 8,
            num_experts_per_tok: 2,
            n_shared_experts: 0,
            shared_expert_intermediate_size: None,
            first_k_dense_replace: 0,
            interleave_moe_layer_step: 1,
            router: RouterConfig {
                gate: Gate::TopK {
                    norm_topk_prob: true,
                },
                bias: false,
                ..RouterConfig::default()
            },
            router_aux_loss_coef: 0.01,
            dispatch: DispatchKind::Auto,
            init: WeightInit::default(),
            precision: Precision::Fp32,
        }
    }
}

/// The attention of one decoder layer (transformers 5's `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LayerType {
    /// Every earlier position.
    FullAttention,
    /// The [`DecoderConfig::sliding_window`] latest positions.
    SlidingAttention,
    /// The earlier positions of the query's chunk of
    /// [`DecoderConfig::attention_chunk_size`] (Llama 4).
    ChunkedAttention,
}

/// The sizes of Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434
/// §2.1), Hugging Face's field names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatentAttention {
    /// Rank of the query compression (`None`: a full `q_proj`).
    pub q_lora_rank: Option<i64>,
    /// Rank of the key/value latent, what the KV cache holds per token.
    pub kv_lora_rank: i64,
    /// Per-head query/key width without positions.
    pub qk_nope_head_dim: i64,
    /// Width of the decoupled RoPE key shared by all heads.
    pub qk_rope_head_dim: i64,
    /// Per-head value width.
    pub v_head_dim: i64,
    /// DeepSeek's interleaved RoPE layout.
    pub rope_interleave: bool,
}

impl Default for LatentAttention {
    /// DeepSeek-V3's layout on a small model: ranks 64 / 32, heads of
    /// 16 + 8 (query/key) and 16 (value).
    fn default() -> Self {
        LatentAttention {
            q_lora_rank: Some(64),
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            rope_interleave: true,
        }
    }
}

/// The settings by which the families of the decoder differ, on the sizes
/// of [`DecoderConfig::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum DecoderPreset {
    /// Mixtral: softmax top-2 over 8 experts, renormalised.
    #[default]
    Mixtral,
    /// Qwen2-MoE: q/k/v bias, fine-grained experts, no renormalisation, a
    /// sigmoid-gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE: QK-norm per head, fine-grained experts renormalised, no
    /// shared expert.
    Qwen3Moe,
    /// DeepSeek-V3: Multi-head Latent Attention, sigmoid gate with aux-free
    /// bias, group-limited top-k, routed scaling 2.5, one shared expert, a
    /// first dense layer.
    DeepseekV3,
    /// DeepSeek-V2(-Lite): DeepSeek-V3's layers with a full query projection
    /// (no `q_lora_rank`, as V2-Lite), the softmax gate with group-limited
    /// greedy selection, not renormalised, two shared experts.
    DeepseekV2,
    /// GLM-4.5: DeepSeek-V3's sigmoid router, shared expert and dense first
    /// layer under grouped-query attention with q/k/v biases, QK-norm per
    /// head and RoPE on half of each head.
    Glm4Moe,
    /// gpt-oss: q/k/v/o biases, attention sinks, windows of 16 positions
    /// (in every layer; gpt-oss alternates them with full layers through
    /// `layer_types`), a biased router softmaxing its top-2 logits, biased
    /// experts with the clamped SwiGLU.
    GptOss,
    /// Llama 4: MoE in every other layer (a sigmoid top-1 router whose
    /// weight scales the expert's input, and a shared expert), dense MLPs
    /// twice as wide between them; RoPE on adjacent pairs with the L2
    /// QK-norm and chunks of 8 positions, every fourth layer without RoPE
    /// (attending to all, its queries temperature-tuned).
    Llama4,
    /// OLMoE: QK-norm, softmax top-2 without renormalisation.
    Olmoe,
    /// Yuan 2.0-M32: localized filtering attention and the attention router.
    Yuan,
    /// LLaMA (dense): every layer a SwiGLU MLP; the source of LLaMA-MoE.
    Llama,
}

impl FromStr for DecoderPreset {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "mixtral" => Ok(DecoderPreset::Mixtral),
            "qwen2_moe" | "qwen" => Ok(DecoderPreset::Qwen2Moe),
            "qwen3_moe" | "qwen3" => Ok(DecoderPreset::Qwen3Moe),
            "deepseek_v3" | "deepseek" => Ok(DecoderPreset::DeepseekV3),
            "deepseek_v2" => Ok(DecoderPreset::DeepseekV2),
            "glm4_moe" | "glm" => Ok(DecoderPreset::Glm4Moe),
            "gpt_oss" => Ok(DecoderPreset::GptOss),
            "llama4" | "llama4_text" => Ok(DecoderPreset::Llama4),
            "olmoe" => Ok(DecoderPreset::Olmoe),
            "yuan" => Ok(DecoderPreset::Yuan),
            "llama" => Ok(DecoderPreset::Llama),
            other => Err(MoeError::config(format!(
                "unknown decoder preset `{other}`: expected mixtral, qwen2_moe, qwen3_moe, \
                 deepseek_v3, deepseek_v2, glm4_moe, gpt_oss, llama4, olmoe, yuan or llama"
            ))),
        }
    }
}

impl moe_core::Validate for DecoderConfig {
    fn validate(&self) -> Result<()> {
        DecoderConfig::validate(self)
    }
}

impl DecoderConfig {
    /// The preset's family settings on the default sizes.
    pub fn preset(preset: DecoderPreset) -> Self {
        let base = DecoderConfig::default();
        match preset {
            DecoderPreset::Mixtral => base,
            DecoderPreset::Qwen2Moe => DecoderConfig {
                attention_bias: true,
                num_local_experts: 16,
                num_experts_per_tok: 4,
                moe_intermediate_size: Some(128),
                shared_expert_intermediate_size: Some(256),
                router: RouterConfig {
                    gate: Gate::TopK {
                        norm_topk_prob: false,
                    },
                    ..base.router.clone()
                },
                ..base
            },
            DecoderPreset::Qwen3Moe => DecoderConfig {
                qk_norm: QkNorm::Head,
                num_local_experts: 16,
                num_experts_per_tok: 4,
                moe_intermediate_size: Some(128),
                rms_norm_eps: 1e-6,
                router: RouterConfig {
                    gate: Gate::TopK {
                        norm_topk_prob: true,
                    },
                    ..base.router.clone()
                },
                ..base
            },
            DecoderPreset::DeepseekV3 => DecoderConfig {
                num_local_experts: 16,
                num_experts_per_tok: 4,
                moe_intermediate_size: Some(128),
                n_shared_experts: 1,
                first_k_dense_replace: 1,
                intermediate_size: 512,
                latent_attention: Some(LatentAttention::default()),
                rms_norm_eps: 1e-6,
                router: RouterConfig {
                    gate: Gate::SigmoidAuxFree {
                        norm_topk_prob: true,
                        bias_update_rate: 1e-3,
                        n_group: 4,
                        topk_group: 2,
                    },
                    routed_scaling_factor: 2.5,
                    ..base.router.clone()
                },
                router_aux_loss_coef: 0.0,
                ..base
            },
            DecoderPreset::DeepseekV2 => {
                let v3 = DecoderConfig::preset(DecoderPreset::DeepseekV3);
                DecoderConfig {
                    n_shared_experts: 2,
                    latent_attention: Some(LatentAttention {
                        q_lora_rank: None,
                        ..LatentAttention::default()
                    }),
                    router: RouterConfig {
                        gate: Gate::GroupLimitedGreedy {
                            norm_topk_prob: false,
                            n_group: 4,
                            topk_group: 2,
                        },
                        routed_scaling_factor: 1.0,
                        ..v3.router.clone()
                    },
                    // Trained with an expert-level balance loss (arXiv
                    // 2405.04434, §2.2.3, alpha_1 = 0.003).
                    router_aux_loss_coef: 0.003,
                    ..v3
                }
            }
            // DeepSeek-V3's MoE layers under grouped-query attention.
            DecoderPreset::Glm4Moe => DecoderConfig {
                attention_bias: true,
                qk_norm: QkNorm::Head,
                partial_rotary_factor: 0.5,
                latent_attention: None,
                rms_norm_eps: 1e-5,
                ..DecoderConfig::preset(DecoderPreset::DeepseekV3)
            },
            DecoderPreset::GptOss => DecoderConfig {
                attention_bias: true,
                o_proj_bias: true,
                attention_sinks: true,
                sliding_window: Some(16),
                expert_activation: Activation::ClampedSwiGlu {
                    alpha: 1.702,
                    limit: 7.0,
                },
                expert_bias: true,
                router: RouterConfig {
                    bias: true,
                    ..base.router.clone()
                },
                router_aux_loss_coef: 0.001,
                ..base
            },
            DecoderPreset::Llama4 => {
                let nope_layers: Vec<i64> = (0..base.num_hidden_layers)
                    .filter(|i| (i + 1) % 4 == 0)
                    .collect();
                DecoderConfig {
                    interleave_moe_layer_step: 2,
                    intermediate_size: 2 * base.intermediate_size,
                    moe_intermediate_size: Some(base.intermediate_size),
                    num_experts_per_tok: 1,
                    n_shared_experts: 1,
                    router: RouterConfig {
                        gate: Gate::SigmoidTopK,
                        bias: false,
                        weights_on: WeightsOn::Input,
                        ..base.router.clone()
                    },
                    router_aux_loss_coef: 0.001,
                    qk_norm: QkNorm::L2,
                    rope_interleave: true,
                    attention_chunk_size: Some(8),
                    layer_types: (0..base.num_hidden_layers)
                        .map(|i| match nope_layers.contains(&i) {
                            true => LayerType::FullAttention,
                            false => LayerType::ChunkedAttention,
                        })
                        .collect(),
                    nope_layers,
                    attn_temperature_tuning: Some(TemperatureTuning {
                        floor_scale: 8.0,
                        attn_scale: 0.1,
                    }),
                    tie_word_embeddings: false,
                    ..base
                }
            }
            DecoderPreset::Olmoe => DecoderConfig {
                qk_norm: QkNorm::Projection,
                router: RouterConfig {
                    gate: Gate::TopK {
                        norm_topk_prob: false,
                    },
                    ..base.router.clone()
                },
                ..base
            },
            DecoderPreset::Yuan => DecoderConfig {
                localized_filtering: true,
                router: RouterConfig {
                    gate: Gate::Attention {
                        norm_topk_prob: true,
                    },
                    ..base.router.clone()
                },
                ..base
            },
            DecoderPreset::Llama => DecoderConfig {
                num_local_experts: 0,
                intermediate_size: 4 * base.hidden_size,
                router_aux_loss_coef: 0.0,
                ..base
            },
        }
    }

    /// Sets the dispatch strategy and, for `capacity[:F]`, the router's
    /// capacity factor.
    pub fn set_dispatch(&mut self, spec: DispatchSpec) {
        spec.apply(&mut self.dispatch, &mut self.router.capacity_factor);
    }

    /// Width of each routed expert.
    pub fn expert_width(&self) -> i64 {
        self.moe_intermediate_size.unwrap_or(self.intermediate_size)
    }

    /// Whether layer `i` has an MoE feed-forward network (else a dense
    /// MLP): there are experts, `i` is past the dense prefix and on the
    /// interleaving step.
    pub fn is_moe_layer(&self, i: i64) -> bool {
        self.num_local_experts > 0
            && i >= self.first_k_dense_replace
            && (i + 1) % self.interleave_moe_layer_step.max(1) == 0
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> i64 {
        (0..self.num_hidden_layers)
            .filter(|&i| self.is_moe_layer(i))
            .count() as i64
    }

    /// The attention layers' config.
    pub fn attention_config(&self) -> GqaConfig {
        GqaConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            partial_rotary_factor: self.partial_rotary_factor,
            attention_bias: self.attention_bias,
            o_proj_bias: self.o_proj_bias,
            qk_norm: self.qk_norm,
            rms_norm_eps: self.rms_norm_eps,
            attention_dropout: self.attention_dropout,
            localized_filtering: self.localized_filtering,
            // Set per layer by `attention_config_of`.
            sliding_window: None,
            attention_chunk_size: None,
            use_rope: true,
            attn_temperature_tuning: None,
            rope_interleave: self.rope_interleave,
            attention_sinks: self.attention_sinks,
            init: self.init,
        }
    }

    /// The window of layer `layer`'s attention: `sliding_window` where
    /// [`Self::layer_types`] says `sliding_attention` (every layer when it
    /// is empty), `None` elsewhere.
    pub fn sliding_window_of(&self, layer: i64) -> Option<i64> {
        self.sliding_window
            .filter(|_| self.layer_is(layer, LayerType::SlidingAttention))
    }

    /// The chunk of layer `layer`'s attention: `attention_chunk_size` where
    /// [`Self::layer_types`] says `chunked_attention` (every layer when it
    /// is empty), `None` elsewhere.
    pub fn attention_chunk_of(&self, layer: i64) -> Option<i64> {
        self.attention_chunk_size
            .filter(|_| self.layer_is(layer, LayerType::ChunkedAttention))
    }

    /// Whether [`Self::layer_types`] gives layer `layer` the attention
    /// `kind`; an empty list gives it every layer.
    fn layer_is(&self, layer: i64, kind: LayerType) -> bool {
        match self.layer_types.get(layer as usize) {
            Some(of_layer) => *of_layer == kind,
            None => self.layer_types.is_empty(),
        }
    }

    /// Whether layer `layer` turns positions with RoPE (not one of
    /// [`Self::nope_layers`]).
    pub fn uses_rope(&self, layer: i64) -> bool {
        !self.nope_layers.contains(&layer)
    }

    /// Layer `layer`'s grouped-query attention: [`Self::attention_config`]
    /// with that layer's window or chunk and, in a NoPE layer, no RoPE, no
    /// L2 QK-norm (Llama 4 normalises the rotated heads only) and the
    /// temperature tuning.
    pub fn attention_config_of(&self, layer: i64) -> GqaConfig {
        let base = self.attention_config();
        let use_rope = self.uses_rope(layer);
        GqaConfig {
            sliding_window: self.sliding_window_of(layer),
            attention_chunk_size: self.attention_chunk_of(layer),
            use_rope,
            qk_norm: match base.qk_norm {
                QkNorm::L2 if !use_rope => QkNorm::None,
                other => other,
            },
            attn_temperature_tuning: self.attn_temperature_tuning.filter(|_| !use_rope),
            ..base
        }
    }

    /// The Multi-head Latent Attention layers' config, when the model uses them.
    pub fn latent_attention_config(&self) -> Option<MlaConfig> {
        self.latent_attention.map(|mla| MlaConfig {
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            q_lora_rank: mla.q_lora_rank,
            kv_lora_rank: mla.kv_lora_rank,
            qk_nope_head_dim: mla.qk_nope_head_dim,
            qk_rope_head_dim: mla.qk_rope_head_dim,
            v_head_dim: mla.v_head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            rope_interleave: mla.rope_interleave,
            // transformers' `DeepseekV3Attention` normalises the latents with
            // `DeepseekV3RMSNorm`'s default eps, not `rms_norm_eps`.
            rms_norm_eps: MlaConfig::default().rms_norm_eps,
            attention_bias: self.attention_bias,
            attention_dropout: self.attention_dropout,
            init: self.init,
        })
    }

    /// The shared experts: DeepSeek's `n_shared_experts` of the routed
    /// width, or Qwen2-MoE's gated one of `shared_expert_intermediate_size`.
    pub fn shared_experts(&self) -> Option<SharedExperts> {
        match (self.n_shared_experts, self.shared_expert_intermediate_size) {
            (0, None) => None,
            // DeepSeek's n shared experts are one MLP of n times the width
            // (Hugging Face's `DeepseekV3MLP(intermediate_size = moe_intermediate_size
            // * n_shared_experts)`): the same function, one GEMM.
            (n, None) => Some(SharedExperts {
                num_experts: 1,
                hidden: n * self.expert_width(),
                sigmoid_gate: false,
            }),
            (_, Some(hidden)) => Some(SharedExperts {
                num_experts: 1,
                hidden,
                sigmoid_gate: true,
            }),
        }
    }

    /// The MoE layers' config: experts of [`Self::expert_activation`], with
    /// biases when [`Self::expert_bias`], no dropout.
    pub fn moe_config(&self) -> SparseMoeConfig {
        SparseMoeConfig {
            n_embd: self.hidden_size,
            num_experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
            expert_hidden: self.expert_width(),
            shared_experts: self.shared_experts(),
            dropout: 0.0,
            activation: self.expert_activation,
            expert_bias: self.expert_bias,
            router: self.router.clone(),
            balance: BalanceLossConfig {
                load_balance: self.router_aux_loss_coef,
                ..BalanceLossConfig::default()
            },
            dispatch: self.dispatch,
            init: self.init,
        }
    }

    /// Parameters a token passes through (the chosen and shared experts of
    /// each MoE layer, not all of them), given the model's `total`.
    pub fn active_params(&self, total: i64) -> i64 {
        if self.num_local_experts == 0 {
            return total;
        }
        let moe = self.moe_config();
        total - self.num_moe_layers() * (moe.total_params() - moe.active_params())
    }

    /// Checks every size and option; the layers' configs check theirs.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(MoeError::config(format!(
                    "{name} must be positive, got {v}"
                )));
            }
        }
        if self.num_local_experts < 0 || self.n_shared_experts < 0 || self.first_k_dense_replace < 0
        {
            return Err(MoeError::config(format!(
                "num_local_experts ({}), n_shared_experts ({}) and first_k_dense_replace ({}) \
                 must be >= 0",
                self.num_local_experts, self.n_shared_experts, self.first_k_dense_replace
            )));
        }
        if self.n_shared_experts > 0 && self.shared_expert_intermediate_size.is_some() {
            return Err(MoeError::config(
                "set n_shared_experts (DeepSeek's ungated shared experts) or \
                 shared_expert_intermediate_size (Qwen2-MoE's gated one), not both",
            ));
        }
        if !self.layer_types.is_empty() && self.layer_types.len() as i64 != self.num_hidden_layers {
            return Err(MoeError::config(format!(
                "layer_types lists {} layers, the model has num_hidden_layers = {}",
                self.layer_types.len(),
                self.num_hidden_layers
            )));
        }
        if self.sliding_window.is_none() && self.layer_types.contains(&LayerType::SlidingAttention)
        {
            return Err(MoeError::config(
                "layer_types has sliding_attention layers but sliding_window is not set",
            ));
        }
        if self.attention_chunk_size.is_none()
            && self.layer_types.contains(&LayerType::ChunkedAttention)
        {
            return Err(MoeError::config(
                "layer_types has chunked_attention layers but attention_chunk_size is not set",
            ));
        }
        if self.layer_types.is_empty()
            && self.sliding_window.is_some()
            && self.attention_chunk_size.is_some()
        {
            return Err(MoeError::config(
                "sliding_window and attention_chunk_size are both set: layer_types must say \
                 which layers slide and which attend in chunks",
            ));
        }
        if let Some(&layer) = self
            .nope_layers
            .iter()
            .find(|&&i| i < 0 || i >= self.num_hidden_layers)
        {
            return Err(MoeError::config(format!(
                "nope_layers names layer {layer}; the model has layers 0..{}",
                self.num_hidden_layers
            )));
        }
        if self.interleave_moe_layer_step < 1 {
            return Err(MoeError::config(format!(
                "interleave_moe_layer_step must be at least 1 (every layer MoE), got {}",
                self.interleave_moe_layer_step
            )));
        }
        if self.latent_attention.is_some()
            && (self.sliding_window.is_some()
                || self.attention_sinks
                || self.attention_chunk_size.is_some()
                || !self.nope_layers.is_empty()
                || self.attn_temperature_tuning.is_some()
                || self.rope_interleave)
        {
            return Err(MoeError::config(
                "sliding_window, attention_sinks, attention_chunk_size, nope_layers, \
                 attn_temperature_tuning and rope_interleave apply to grouped-query attention; \
                 latent attention (DeepSeek) has none of them (its own rope_interleave is \
                 latent_attention.rope_interleave)",
            ));
        }
        if self.latent_attention.is_some() && self.partial_rotary_factor != 1.0 {
            return Err(MoeError::config(format!(
                "partial_rotary_factor = {} applies to grouped-query attention; latent \
                 attention turns qk_rope_head_dim dimensions (set it to 1)",
                self.partial_rotary_factor
            )));
        }
        match self.latent_attention_config() {
            Some(mla) => mla.validate()?,
            None => {
                // The layers differ by their window, chunk and RoPE, checked
                // above: the first layer, and the first NoPE layer for its
                // temperature tuning, stand for all of them.
                let nope = self.nope_layers.first().copied();
                for layer in std::iter::once(0).chain(nope) {
                    self.attention_config_of(layer).validate()?;
                }
            }
        }
        if let Some(w) = self.sliding_window.filter(|&w| w < 1) {
            return Err(MoeError::config(format!(
                "sliding_window must be at least 1 (a query sees itself), got {w}"
            )));
        }
        if self.num_local_experts > 0 {
            self.moe_config().validate()?;
        }
        Ok(())
    }
}
