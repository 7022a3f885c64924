//! Training of `moe-layers` models, each concern in its own file:
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`TrainConfig`]: batches, schedule ([`LrSchedule`]), clipping, accumulation, decay groups |
//! | `optimizer.rs` | the [`Optimizer`] trait, [`clip_grad_norm`] |
//! | `adamw.rs` | [`AdamW`] (libtorch's fused kernel, checkpointable state) |
//! | `trainer.rs` | [`Trainer`], nanoGPT's loop over any [`CausalLm`](moe_models::CausalLm) |
//! | `eval.rs` | [`estimate_loss`], routing statistics |
//! | `events.rs` | [`TrainEvent`], the typed records of a run |
//! | `checkpoint.rs` | resumable checkpoints (safetensors + `config.json`) |
//! | `topology.rs` | [`Topology`]: where the steps run ([`Single`], [`DataParallel`], [`SimulatedRanks`]), called by the trainer for batches, gradients, metrics and checkpoints |
//! | `data_parallel.rs` | [`DataParallel`]: training on the ranks of a c10d group beside expert parallelism |
#![warn(missing_docs)]

mod adamw;
mod checkpoint;
mod config;
pub mod data_parallel;
mod eval;
mod events;
mod optimizer;
mod tensor_file;
mod topology;
mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use checkpoint::{
    load_checkpoint, load_checkpoint_meta, save_checkpoint, Checkpoint, CheckpointMeta,
    CONFIG_FILE, OPTIMIZER_FILE, WEIGHTS_FILE,
};
pub use config::{DecayGroups, LrSchedule, TrainConfig};
pub use data_parallel::DataParallel;
pub use eval::{estimate_loss, estimate_routing_stats, parameter_count, EvalLosses};
pub use events::TrainEvent;
pub use optimizer::{clip_grad_norm, Optimizer};
pub use topology::{SimulatedRanks, Single, Topology};
pub use trainer::{Checkpointing, StepPhases, Trainer};
