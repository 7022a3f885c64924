//! Where a [`crate::Trainer`]'s steps run, as one strategy the trainer
//! calls unconditionally: [`Single`] (one process), [`DataParallel`] (this
//! process is one rank of a c10d group, data-parallel for the replicated
//! variables and expert-parallel for the experts) and [`SimulatedRanks`]
//! (one process computing what several ranks compute, for tests and
//! comparisons). A [`Topology`] decides the step's seeding and batches, how
//! gradients, the gradient norm and metrics combine over the ranks, and how
//! a checkpoint is written and read.

use crate::checkpoint::{read_weights, read_weights_of_sizes, save_files};
use crate::data_parallel::{rank_seed, DataParallel};
use crate::eval::draw_seeded;
use crate::{clip_grad_norm, CheckpointMeta, EvalLosses, Optimizer, OPTIMIZER_FILE};
use moe_core::{MoeError, Result};
use moe_data::{Batch, Dataset, Split};
use moe_routers::RoutingStats;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// How a training step spreads over processes. Every method has the
/// single-process behaviour as its default.
pub trait Topology: std::fmt::Debug {
    /// This process's rank (0 in one process); only rank 0 reports events.
    fn rank(&self) -> i64 {
        0
    }

    /// Seeds libtorch's generators for step `step` of a run seeded `seed`
    /// (`seed + step`, so that a resumed run draws what the uninterrupted
    /// one drew).
    fn seed_step(&self, seed: i64, step: i64) {
        tch::manual_seed(seed + step);
    }

    /// Micro-batch `micro` of step `step`: `size` rows per rank.
    fn batch(&self, data: &Dataset, size: i64, seed: i64, step: i64, micro: i64) -> Batch;

    /// Combines the ranks' gradients of `variables` (nothing in one process).
    fn reduce_gradients(&self, variables: &[(String, Tensor)]) -> Result<()> {
        let _ = variables;
        Ok(())
    }

    /// Scales the gradients so that their global norm is at most
    /// `max_norm`; returns the norm before scaling.
    fn clip_grad_norm(
        &self,
        variables: &[(String, Tensor)],
        trainable: &[Tensor],
        max_norm: f64,
    ) -> Result<Tensor> {
        let _ = variables;
        Ok(clip_grad_norm(trainable, max_norm))
    }

    /// The mean over the ranks of a device scalar (the step's loss).
    fn mean(&self, value: Tensor) -> Result<Tensor> {
        Ok(value)
    }

    /// An evaluation over the ranks: their mean losses, their summed
    /// routing loads.
    fn combine_eval(
        &self,
        losses: EvalLosses,
        routing: Vec<RoutingStats>,
    ) -> Result<(EvalLosses, Vec<RoutingStats>)> {
        Ok((losses, routing))
    }

    /// Writes a training checkpoint of `variables` and `optimizer`'s state
    /// to `dir`.
    fn save_checkpoint(
        &self,
        dir: &Path,
        variables: &[(String, Tensor)],
        optimizer: &dyn Optimizer,
        meta: &CheckpointMeta,
    ) -> Result<()> {
        save_files(dir, variables, Some(optimizer), meta)
    }

    /// Reads a checkpoint of `dir` written at step `step`: the values of
    /// `variables` (returned, to copy in once everything is checked) and
    /// `optimizer`'s state (loaded).
    fn load_checkpoint(
        &self,
        dir: &Path,
        variables: &[(String, Tensor)],
        optimizer: &mut dyn Optimizer,
        step: i64,
    ) -> Result<HashMap<String, Tensor>> {
        let weights = read_weights(dir, variables)?;
        optimizer.load_checked(&dir.join(OPTIMIZER_FILE), step)?;
        Ok(weights)
    }
}

/// One process: the batches of the step's seed, gradients and metrics as
/// they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Topology for Single {
    fn batch(&self, data: &Dataset, size: i64, _seed: i64, _step: i64, _micro: i64) -> Batch {
        data.batch(Split::Train, size)
    }
}

/// One process computing what this many data-parallel ranks compute: each
/// micro-batch is the concatenation of the ranks' batches, each drawn with
/// its rank's seed ([`rank_seed`]). Dropout and router noise draw
/// differently from the ranks', so a comparison runs without them.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedRanks(i64);

impl SimulatedRanks {
    /// `ranks` ranks, at least 1.
    pub fn new(ranks: i64) -> Result<Self> {
        if ranks < 1 {
            return Err(MoeError::config(format!(
                "simulated ranks must be >= 1, got {ranks}"
            )));
        }
        Ok(SimulatedRanks(ranks))
    }
}

impl Topology for SimulatedRanks {
    fn batch(&self, data: &Dataset, size: i64, seed: i64, step: i64, micro: i64) -> Batch {
        let parts: Vec<Batch> = (0..self.0)
            .map(|rank| draw_seeded(data, Split::Train, size, rank_seed(seed, step, micro, rank)))
            .collect();
        let xs: Vec<&Tensor> = parts.iter().map(|b| &b.x).collect();
        let ys: Vec<&Tensor> = parts.iter().map(|b| &b.y).collect();
        Batch {
            x: Tensor::cat(&xs, 0),
            y: Tensor::cat(&ys, 0),
        }
    }
}

/// The optimizer state's file of rank `rank`.
fn rank_optimizer_file(rank: i64) -> String {
    format!("optimizer.rank{rank}.safetensors")
}

/// This process as one rank of a c10d group: it draws its own batches
/// (with its own seed, right before each), averages the replicated
/// gradients and scales the expert shards' ([`crate::data_parallel`]),
/// clips by the norm over every rank, reports the ranks' mean loss, and
/// writes the whole model (the expert shards gathered, by rank 0) beside
/// each rank's optimizer state (`optimizer.rank{r}.safetensors`).
impl Topology for DataParallel {
    fn rank(&self) -> i64 {
        DataParallel::rank(self)
    }

    fn seed_step(&self, _seed: i64, _step: i64) {
        // A rank seeds with its own seed right before each batch.
    }

    fn batch(&self, data: &Dataset, size: i64, seed: i64, step: i64, micro: i64) -> Batch {
        let rank_seed = rank_seed(seed, step, micro, DataParallel::rank(self));
        draw_seeded(data, Split::Train, size, rank_seed)
    }

    fn reduce_gradients(&self, variables: &[(String, Tensor)]) -> Result<()> {
        DataParallel::reduce_gradients(self, variables)
    }

    fn clip_grad_norm(
        &self,
        variables: &[(String, Tensor)],
        _trainable: &[Tensor],
        max_norm: f64,
    ) -> Result<Tensor> {
        DataParallel::clip_grad_norm(self, variables, max_norm)
    }

    fn mean(&self, value: Tensor) -> Result<Tensor> {
        DataParallel::mean(self, &value)
    }

    fn combine_eval(
        &self,
        losses: EvalLosses,
        routing: Vec<RoutingStats>,
    ) -> Result<(EvalLosses, Vec<RoutingStats>)> {
        let mean = |v: f64| -> Result<f64> {
            Ok(DataParallel::mean(self, &Tensor::from(v))?.double_value(&[]))
        };
        let losses = EvalLosses {
            train: mean(losses.train)?,
            val: mean(losses.val)?,
        };
        Ok((losses, self.global_routing_stats(routing)?))
    }

    fn save_checkpoint(
        &self,
        dir: &Path,
        variables: &[(String, Tensor)],
        optimizer: &dyn Optimizer,
        meta: &CheckpointMeta,
    ) -> Result<()> {
        // The whole model in one file a single process loads; each rank's
        // optimizer state (with its expert shards) beside it.
        let whole = self.gather_variables(variables)?;
        std::fs::create_dir_all(dir).map_err(|e| MoeError::io(dir, e))?;
        optimizer.save(&dir.join(rank_optimizer_file(DataParallel::rank(self))))?;
        self.barrier()?;
        if DataParallel::rank(self) == 0 {
            save_files(dir, &whole, None, meta)?;
        }
        self.barrier()
    }

    fn load_checkpoint(
        &self,
        dir: &Path,
        variables: &[(String, Tensor)],
        optimizer: &mut dyn Optimizer,
        step: i64,
    ) -> Result<HashMap<String, Tensor>> {
        // The file holds whole banks (checked against their sizes, without
        // gathering them); this rank takes its shards.
        let whole: Vec<(String, Vec<i64>)> = (variables.iter())
            .map(|(name, t)| (name.clone(), self.whole_size(name, t)))
            .collect();
        let mut weights = read_weights_of_sizes(dir, &whole)?;
        for (name, value) in weights.iter_mut() {
            *value = self.shard_of(name, value)?;
        }
        let file = dir.join(rank_optimizer_file(DataParallel::rank(self)));
        optimizer.load_checked(&file, step)?;
        Ok(weights)
    }
}
