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
//! | [`core`] | `moe-layers-core` | `MoeError`, init schemes, devices, dropout, `Routing` |
//! | [`aten`] | `moe-layers-aten` | libtorch operators tch does not bind (fused AdamW) |
//! | [`nn`] | `moe-layers-nn` | attention with KV cache and the other non-MoE layers |
//! | [`routers`] | `moe-layers-routers` | gates: top-k, noisy top-k, attention, sigmoid aux-free (group-limited) |
//! | [`experts`] | `moe-layers-experts` | stacked expert FFN banks |
//! | [`dispatch`] | `moe-layers-dispatch` | sending tokens to experts and combining |
//! | [`block`] | `moe-layers-block` | the `SparseMoe` layer |
//! | [`models`] | `moe-layers-models` | model families, the `CausalLm` trait, generation |
//! | [`data`] | `moe-layers-data` | tokenizers, datasets, batches |
//! | [`hf`] | `moe-layers-hf` | Hugging Face checkpoints in and out (`from_pretrained`, `save_pretrained`) |
//! | [`train`] | `moe-layers-train` | optimizer, trainer, evaluation, checkpoints |
//! | [`run`] | `moe-layers-run` | run configs, metrics, MLflow, plots, progress |
//!
//! [`lm`] gathers what a language-model program needs from the last four.
//!
//! ## Features
//!
//! The layers (`core`, `nn`, `routers`, `experts`, `dispatch`, `block`)
//! are always compiled, and need no C++ of ours: `default-features = false`
//! gives `SparseMoe` and its parts without tokenizers, plotting or the C++
//! shim. Each feature adds one job and what it needs to compile:
//!
//! | feature | adds | compiles |
//! |---|---|---|
//! | `dist` | expert parallelism across processes (`dispatch::ExpertParallel`, `aten::dist`) | the C++ shim with c10d |
//! | `models` | model families, generation | |
//! | `data` | tokenizers, datasets | Hugging Face `tokenizers` |
//! | `train` | trainer, fused AdamW, checkpoints, data parallelism | the C++ shim |
//! | `run` | run configs, metrics, progress, MLflow's legacy file store | TOML, indicatif |
//! | `plot` | loss-curve PNGs (`run::plot_loss_curve`) | plotters |
//! | `mlflow` | logging to an MLflow tracking server (`run::MlflowClient`) | ureq with rustls |
//! | `hf` | Hugging Face checkpoints in and out | safetensors, memory maps |
//! | `lm` (default) | all of the above | |
//! | `cli` (default) | `clap::ValueEnum` on the kind enums (devices, presets, ...) | clap |
//!
//! `tch` is re-exported, so that a user's tensors come from the same tch as
//! the library's. A program's `build.rs` should call
//! [`moe_layers_build::link_libtorch`](https://docs.rs/moe-layers-build) so
//! that CUDA loads (see the README, "Using moe-layers in your own crate").
#![warn(missing_docs)]

#[cfg(any(feature = "dist", feature = "train"))]
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
    pub use moe_experts::{ExpertBank, ExpertConfig, ExpertQuantization};
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
