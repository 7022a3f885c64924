//! Evaluation: makeMoE's `estimate_loss` and the routing statistics of
//! each MoE layer, for any [`CausalLm`].

use crate::TrainConfig;
use moe_core::Result;
use moe_data::{Batch, Dataset, Split};
use moe_models::CausalLm;
use moe_routers::RoutingStats;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Mean loss of each split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalLosses {
    /// On the training split.
    pub train: f64,
    /// On the validation split.
    pub val: f64,
}

/// Number of trainable parameters.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// makeMoE's `estimate_loss`: the mean cross-entropy (balance losses
/// excluded, so that runs with and without them compare) over `eval_iters` random
/// batches of each split, in evaluation mode and without gradients. The
/// batches are stacked into forward passes of up to `eval_rows` sequences
/// (same expectation, far fewer kernel launches) and the sum is read back
/// once per split.
pub fn estimate_loss<M: CausalLm + ?Sized>(
    model: &M,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<EvalLosses> {
    let per_chunk = (config.eval_rows / config.batch_size).max(1);
    let mean = |split: Split| -> Result<f64> {
        tch::no_grad(|| {
            let mut total = Tensor::zeros([], (Kind::Float, model.device()));
            let mut done = 0;
            while done < config.eval_iters {
                let batches = per_chunk.min(config.eval_iters - done);
                let batch = draw(data, split, batches * config.batch_size);
                total += model
                    .batch_objective(&batch.x, &batch.y, false)?
                    .cross_entropy
                    * batches as f64;
                done += batches;
            }
            Ok(total.double_value(&[]) / config.eval_iters as f64)
        })
    };
    Ok(EvalLosses {
        train: mean(Split::Train)?,
        val: mean(Split::Val)?,
    })
}

/// Routing statistics of each MoE layer over one evaluation-mode forward
/// pass of `min(eval_rows, eval_iters * batch_size)` random validation sequences.
pub fn estimate_routing_stats<M: CausalLm + ?Sized>(
    model: &M,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<Vec<RoutingStats>> {
    let rows = config.eval_rows.min(config.eval_iters * config.batch_size);
    model.routing_stats(&draw(data, Split::Val, rows).x)
}

/// Draws a batch from libtorch's one generator, which the ranks of a
/// data-parallel run share when they are threads of one process: every
/// draw of the trainer goes through this lock, with the seeding before it
/// ([`draw_seeded`]), so that no rank's draw lands between another's seed
/// and its batch.
pub(crate) fn draw(data: &Dataset, split: Split, rows: i64) -> Batch {
    let _draw = DRAW.lock().unwrap_or_else(|p| p.into_inner());
    data.batch(split, rows)
}

/// [`draw`] right after seeding libtorch's generator with `seed`.
pub(crate) fn draw_seeded(data: &Dataset, split: Split, rows: i64, seed: i64) -> Batch {
    let _draw = DRAW.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    data.batch(split, rows)
}

static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
