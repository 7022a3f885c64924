//! Model families of `moe-layers` behind one trait, [`CausalLm`]:
//!
//! - [`makemoe`]: makeMoE's character-level model (learned positions,
//!   LayerNorm, biases everywhere), whose preset reproduces the tutorial;
//! - [`decoder`]: the Mixtral-style decoder (RMSNorm, RoPE, grouped-query
//!   attention, SwiGLU experts), whose config covers Mixtral, Qwen2-MoE,
//!   DeepSeek-V3, OLMoE, LLaMA(-MoE) and Yuan 2.0-M32;
//!
//! and [`generate`], KV-cached sampling for any of them. [`LmConfig`] names
//! a family with its config (what checkpoints and run configs store).
//!
//! Layers come from the crates below (`moe-nn`, `moe-block`); data,
//! training and run tooling live above (`moe-data`, `moe-train`, `moe-run`).
#![warn(missing_docs)]

mod causal_lm;
pub mod decoder;
mod family;
mod generate;
pub mod makemoe;
mod sampling;

pub use causal_lm::{check_context, cross_entropy, BatchLoss, CausalLm, ForwardOutput, ModelCache};
pub use decoder::{
    resize_vocab, DecoderConfig, DecoderModel, DecoderPreset, ExpertConstruction, LatentAttention,
    LayerType, MoeConversion,
};
pub use family::{CommonModelSettings, LmConfig};
pub use generate::{generate, generate_batch, generate_recompute, generate_with, GenerateOptions};
pub use makemoe::{MakeMoeConfig, MakeMoeModel, Preset};
pub use sampling::{Sampling, SamplingFlags};
