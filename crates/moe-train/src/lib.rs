//! Training of `moe-layers` models: [`Trainer`], nanoGPT's loop over any
//! [`CausalLm`](moe_models::CausalLm), with [`AdamW`] (libtorch's fused
//! kernel, its state checkpointable), evaluation ([`estimate_loss`]) and
//! resumable checkpoints (safetensors + `config.json`).

mod adamw;
mod checkpoint;
mod config;
mod tensor_file;
mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use checkpoint::{
    load_checkpoint, load_checkpoint_meta, save_checkpoint, Checkpoint, CheckpointMeta,
    CONFIG_FILE, OPTIMIZER_FILE, WEIGHTS_FILE,
};
pub use config::TrainConfig;
pub use trainer::{
    estimate_loss, estimate_routing_stats, parameter_count, Checkpointing, EvalLosses, StepPhases,
    TrainEvent, Trainer,
};
