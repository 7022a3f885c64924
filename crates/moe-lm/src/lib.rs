//! The makeMoE sparse Mixture-of-Experts language model
//! (<https://github.com/AviSoori1x/makeMoE>), built from the layers of
//! `moe-layers`: character and BPE tokenizers, data batches, the model, its
//! training loop (own AdamW, resumable checkpoints) with evaluation and
//! metrics (JSON lines, MLflow file store, PNG plots), KV-cached text
//! generation, and run configs in TOML or JSON.

mod adamw;
mod block;
mod bpe;
mod checkpoint;
mod config;
mod data;
mod generate;
mod metrics;
mod mlflow;
mod model;
mod plot;
mod run_config;
mod tensor_file;
mod tokenizer;
mod train;

pub use adamw::{AdamW, AdamWConfig};
pub use block::Block;
pub use bpe::BpeTokenizer;
pub use checkpoint::{
    load_checkpoint, load_checkpoint_meta, save_checkpoint, Checkpoint, CheckpointMeta,
    CONFIG_FILE, OPTIMIZER_FILE, WEIGHTS_FILE,
};
pub use config::{ModelConfig, Preset, TrainConfig};
pub use data::{Batch, Dataset, Split};
pub use generate::{generate, generate_recompute, Sampling};
pub use metrics::JsonlWriter;
pub use mlflow::{MlflowRun, RunStatus};
pub use model::{BatchLoss, ForwardOutput, ModelCache, MoeLanguageModel};
pub use plot::{plot_loss_curve, LossCurves, FONT_PATHS};
pub use run_config::RunConfig;
pub use tokenizer::{CharTokenizer, TextStream, Tokenizer, TokenizerConfig, TokenizerKind};
pub use train::{
    estimate_loss, estimate_routing_stats, parameter_count, Checkpointing, EvalLosses, StepPhases,
    TrainEvent, Trainer,
};
