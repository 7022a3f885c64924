//! Neural-network building blocks of `moe-layers`: the attention
//! ("communication") half of every transformer block, with KV caches for
//! incremental decoding, and the pieces of Llama-style MoE decoders
//! (Mixtral, Qwen2-MoE, DeepSeek-V2/V3, OLMoE, Yuan 2.0): RoPE and its
//! scaling schemes, grouped-query attention and DeepSeek's Multi-head Latent
//! Attention, RMSNorm, the SwiGLU MLP.
//!
//! What lives where:
//!
//! - `causal_self_attention.rs`: [`CausalSelfAttention`], makeMoE's causal
//!   multi-head self-attention (Vaswani et al. 2017, arXiv 1706.03762). One
//!   set of parameters, two forward paths that compute the same function:
//!   [`AttentionPath::PerHead`] loops over heads and masks a `T x T` score
//!   matrix as makeMoE (and Karpathy's makemore) write it, and
//!   [`AttentionPath::Fused`] projects q, k, v in one matmul and calls
//!   libtorch's fused `scaled_dot_product_attention`.
//! - `config.rs`: its [`AttentionConfig`], [`AttentionPath`],
//!   [`AttentionScale`].
//! - `gqa.rs`: [`GroupedQueryAttention`], grouped-query causal
//!   self-attention with RoPE (Ainslie et al. 2023, arXiv 2305.13245),
//!   optional q/k/v biases, QK-norm and localized filtering.
//! - `gqa_config.rs`: its [`GqaConfig`] and [`QkNorm`].
//! - `mla.rs`: [`MultiHeadLatentAttention`], DeepSeek-V2/V3's Multi-head
//!   Latent Attention (arXiv 2405.04434 §2.1; Hugging Face's
//!   `DeepseekV3Attention`): low-rank queries, keys and values expanded from
//!   a compressed latent, a decoupled RoPE key shared by all heads, and a KV
//!   cache of the latent.
//! - `mla_config.rs`: its [`MlaConfig`] (Hugging Face's `DeepseekV3Config`
//!   names, [`MlaConfig::deepseek_v3`], cache bytes per token).
//! - `lfa.rs`: [`LocalizedFiltering`], the query/key input filter of
//!   Yuan 2.0's Localized Filtering-based Attention (arXiv 2311.15786).
//! - `kv_cache.rs`: [`KvCache`], what one attention layer caches: keys and
//!   values (and filter state), or MLA's latents and RoPE keys.
//! - `norm.rs`: [`RmsNorm`] (Zhang & Sennrich 2019, arXiv 1910.07467).
//! - `rope.rs`: [`Rope`], rotary position embeddings (Su et al. 2021,
//!   arXiv 2104.09864) in the half-split and DeepSeek's interleaved layouts,
//!   with [`default_inv_freq`] and [`rope_tables`].
//! - `rope_scaling.rs`: [`RopeScaling`], the `rope_scaling` block of a
//!   Hugging Face config (linear, dynamic NTK, YaRN, Llama 3) and the
//!   inverse frequencies and attention factor each gives
//!   (`modeling_rope_utils.py`).
//! - `mlp.rs`: [`SwiGluMlp`], the dense SwiGLU feed-forward network
//!   (Shazeer 2020, arXiv 2002.05202).
//! - `sdpa.rs` (private): the causal scaled dot-product attention kernel
//!   and mask the attention layers call.
#![warn(missing_docs)]

mod causal_self_attention;
mod config;
mod gqa;
mod gqa_config;
mod kv_cache;
mod lfa;
mod mla;
mod mla_config;
mod mlp;
mod norm;
mod rope;
mod rope_scaling;
mod sdpa;

pub use causal_self_attention::CausalSelfAttention;
pub use config::{AttentionConfig, AttentionPath, AttentionScale};
pub use gqa::GroupedQueryAttention;
pub use gqa_config::{GqaConfig, QkNorm, TemperatureTuning};
pub use kv_cache::KvCache;
pub use lfa::LocalizedFiltering;
pub use mla::MultiHeadLatentAttention;
pub use mla_config::MlaConfig;
pub use mlp::SwiGluMlp;
pub use norm::RmsNorm;
pub use rope::{default_inv_freq, rope_tables, Rope};
pub use rope_scaling::RopeScaling;
