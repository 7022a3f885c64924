//! # moe-layers
//!
//! Sparse Mixture-of-Experts layers and models for Rust on libtorch (`tch`):
//! attention, routers, stacked expert banks, dispatch strategies, the
//! [`SparseMoe`](block::SparseMoe) layer, model families behind one
//! [`CausalLm`](models::CausalLm) trait, and the tooling to train them.
//!
//! This crate is the facade: it re-exports the workspace's crates, one job
//! each, under short module names. Dependencies point down this table.
//!
//! | module | crate | job |
//! |---|---|---|
//! | [`core`] | `moe-core` | `MoeError`, init schemes, devices, dropout, `Routing` |
//! | [`aten`] | `moe-aten` | libtorch operators tch does not bind (fused AdamW) |
//! | [`nn`] | `moe-nn` | attention with KV cache and the other non-MoE layers |
//! | [`routers`] | `moe-routers` | gates: top-k, noisy top-k, attention, sigmoid aux-free (group-limited) |
//! | [`experts`] | `moe-experts` | stacked expert FFN banks |
//! | [`dispatch`] | `moe-dispatch` | sending tokens to experts and combining |
//! | [`block`] | `moe-block` | the `SparseMoe` layer |
//! | [`models`] | `moe-models` | model families, the `CausalLm` trait, generation |
//! | [`data`] | `moe-data` | tokenizers, datasets, batches |
//! | [`hf`] | `moe-hf` | Hugging Face checkpoints in and out (`from_pretrained`, `save_pretrained`) |
//! | [`train`] | `moe-train` | optimizer, trainer, evaluation, checkpoints |
//! | [`run`] | `moe-run` | run configs, metrics, MLflow, plots, progress |
//!
//! [`lm`] gathers what a language-model program needs from the last four.
//!
//! ## Features
//!
//! The layers are always compiled, with the C++ shim `aten` (c10d process
//! groups for expert parallelism, fused AdamW). `models`, `data`
//! (tokenizers), `hf` (Hugging Face checkpoints: safetensors, memory maps),
//! `train`, `run` (plotters, TOML) and `lm` (all of them, the default) add
//! the rest: `default-features = false` gives `SparseMoe` and its parts
//! without tokenizers or plotting. `tch` is re-exported, so that a user's
//! tensors come from the same tch as the library's.

pub use moe_aten as aten;
pub use moe_block as block;
pub use moe_core as core;
#[cfg(feature = "data")]
pub use moe_data as data;
pub use moe_dispatch as dispatch;
pub use moe_experts as experts;
#[cfg(feature = "hf")]
pub use moe_hf as hf;
#[cfg(feature = "models")]
pub use moe_models as models;
pub use moe_nn as nn;
pub use moe_routers as routers;
#[cfg(feature = "run")]
pub use moe_run as run;
#[cfg(feature = "train")]
pub use moe_train as train;

pub use moe_core::{MoeError, Result};
pub use tch;

/// Everything a language-model program uses, from `models`, `data`,
/// `train` and `run`, in one place.
#[cfg(feature = "lm")]
pub mod lm {
    pub use moe_data::*;
    pub use moe_models::*;
    pub use moe_run::*;
    pub use moe_train::*;
}

/// The types most programs need.
pub mod prelude {
    pub use moe_block::{FineGrained, MoeOutput, SharedExperts, SparseMoe, SparseMoeConfig};
    pub use moe_core::{DeviceChoice, MoeError, Precision, Result, Routing, WeightInit};
    #[cfg(feature = "data")]
    pub use moe_data::{CharTokenizer, Dataset};
    pub use moe_dispatch::{Dispatch, DispatchKind, DispatchSpec};
    pub use moe_experts::{ExpertBank, ExpertConfig};
    #[cfg(feature = "models")]
    pub use moe_models::{
        generate, CausalLm, DecoderConfig, DecoderModel, LmConfig, MakeMoeConfig, MakeMoeModel,
        Preset, Sampling,
    };
    pub use moe_nn::{AttentionConfig, AttentionPath, AttentionScale, CausalSelfAttention};
    pub use moe_routers::{Gate, Router, RouterConfig, RouterDims};
    #[cfg(feature = "train")]
    pub use moe_train::{TrainConfig, Trainer};
}

/// The README's code examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "lm"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
