//! # moe-layers
//!
//! Sparse Mixture-of-Experts layers for Rust on libtorch (`tch`): causal
//! self-attention, routers, stacked expert banks, dispatch strategies, the
//! [`SparseMoe`](block::SparseMoe) layer, and the makeMoE character-level
//! language model that trains on tinyshakespeare and generates text.
//!
//! This crate is the facade: it re-exports the workspace's crates, one job
//! each, under short module names.
//!
//! | module | crate | job |
//! |---|---|---|
//! | [`core`] | `moe-core` | `MoeError`, init schemes, devices, dropout, `Routing` |
//! | [`aten`] | `moe-aten` | libtorch operators tch does not bind (fused AdamW) |
//! | [`attention`] | `moe-attention` | causal multi-head self-attention |
//! | [`routers`] | `moe-routers` | top-k, noisy top-k, attention, DeepSeekMoE and aux-free gates |
//! | [`experts`] | `moe-experts` | stacked expert FFN banks |
//! | [`dispatch`] | `moe-dispatch` | sending tokens to experts and combining |
//! | [`block`] | `moe-block` | the `SparseMoe` layer |
//! | [`lm`] | `moe-lm` | the language model, training, generation, checkpoints |

pub use moe_aten as aten;
pub use moe_attention as attention;
pub use moe_block as block;
pub use moe_core as core;
pub use moe_dispatch as dispatch;
pub use moe_experts as experts;
pub use moe_lm as lm;
pub use moe_routers as routers;

pub use moe_core::{MoeError, Result};

/// The types most programs need.
pub mod prelude {
    pub use moe_attention::{AttentionConfig, AttentionPath, AttentionScale, CausalSelfAttention};
    pub use moe_block::{MoeOutput, SparseMoe, SparseMoeConfig};
    pub use moe_core::{DeviceChoice, MoeError, Precision, Result, Routing, WeightInit};
    pub use moe_dispatch::{Dispatch, DispatchKind};
    pub use moe_experts::{ExpertBank, ExpertConfig};
    pub use moe_lm::{
        generate, CharTokenizer, Dataset, ModelConfig, MoeLanguageModel, Preset, Sampling,
        TrainConfig, Trainer,
    };
    pub use moe_routers::{Router, RouterConfig, RouterKind};
}

/// The README's code examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
