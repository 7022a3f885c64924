//! The decoder family: pre-RMSNorm layers, rotary positions, grouped-query
//! attention, bias-free projections, SwiGLU experts, any router of the
//! library, tied or untied embeddings, optional QK-norm (OLMoE) and
//! localized filtering (Yuan 2.0). One [`DecoderConfig`] with Hugging
//! Face's field names covers Mixtral, Qwen2-MoE, DeepSeek-V3,
//! OLMoE, LLaMA(-MoE) and Yuan 2.0-M32 ([`DecoderPreset`]).
//!
//! - `config.rs`: [`DecoderConfig`], [`DecoderPreset`];
//! - `layer.rs`: [`DecoderLayer`] (attention + dense or MoE feed-forward);
//! - `model.rs`: [`DecoderModel`], the [`crate::CausalLm`];
//! - `convert.rs`: LLaMA-MoE's conversion of a dense model ([`MoeConversion`]);
//! - `resize.rs`: a larger vocabulary, new rows at the mean of the old
//!   ones ([`resize_vocab`]).

mod config;
mod convert;
mod layer;
mod model;
mod quantize;
mod resize;

pub use config::{DecoderConfig, DecoderPreset, LatentAttention, LayerType};
pub use convert::{ExpertConstruction, MoeConversion};
pub use layer::{Attention, DecoderLayer, FeedForward, LayerOutput};
pub use model::DecoderModel;
pub use resize::resize_vocab;
