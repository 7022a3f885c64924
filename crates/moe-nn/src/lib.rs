//! Causal multi-head self-attention (Vaswani et al. 2017, arXiv 1706.03762),
//! the "communication" half of every transformer block of `moe-layers`.
//!
//! One set of parameters, two forward paths that compute the same function:
//! [`AttentionPath::PerHead`] loops over heads and masks a `T x T` score
//! matrix as makeMoE (and Karpathy's makemore) write it, and
//! [`AttentionPath::Fused`] projects q, k, v in one matmul and calls
//! libtorch's fused `scaled_dot_product_attention`.

mod causal_self_attention;
mod config;
mod kv_cache;

pub use causal_self_attention::CausalSelfAttention;
pub use config::{AttentionConfig, AttentionPath, AttentionScale};
pub use kv_cache::KvCache;
