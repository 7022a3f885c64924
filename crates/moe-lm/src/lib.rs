//! The makeMoE sparse Mixture-of-Experts language model
//! (<https://github.com/AviSoori1x/makeMoE>), built from the layers of
//! `moe-layers`: character tokenizer, data batches, the model, its training
//! loop with evaluation and metrics, text generation and checkpoints.

mod block;
mod checkpoint;
mod config;
mod data;
mod generate;
mod metrics;
mod model;
mod tokenizer;
mod train;

pub use block::Block;
pub use checkpoint::{load_checkpoint, save_checkpoint, Checkpoint, CheckpointMeta};
pub use config::{ModelConfig, Preset, TrainConfig};
pub use data::{Batch, Dataset, Split};
pub use generate::{generate, Sampling};
pub use metrics::JsonlWriter;
pub use model::{BatchLoss, ForwardOutput, MoeLanguageModel};
pub use tokenizer::CharTokenizer;
pub use train::{
    estimate_loss, estimate_routing_stats, parameter_count, EvalLosses, TrainEvent, Trainer,
};
