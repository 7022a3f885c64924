//! makeMoE's character-level sparse MoE language model
//! (<https://github.com/AviSoori1x/makeMoE>): learned absolute positions,
//! pre-LayerNorm blocks, per-head or fused attention, noisy top-k routing,
//! biases everywhere. Its preset reproduces the tutorial's numbers.

mod block;
mod config;
mod model;

pub use block::Block;
pub use config::{MakeMoeConfig, Preset};
pub use model::MakeMoeModel;
