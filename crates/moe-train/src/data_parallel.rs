//! Training on the ranks of a c10d group: data parallelism for every
//! variable held whole on each rank (embeddings, attention, norms, routers,
//! shared experts), expert parallelism for the experts, whose shards stay
//! on their rank (`moe_dispatch::ExpertParallel`).
//!
//! Each rank draws its own batches ([`rank_seed`]); the loss of a step is
//! the mean of the ranks' losses, that of the global batch. Its gradient:
//!
//! - replicated variables: each rank's gradient covers its own tokens, so
//!   the gradients are averaged (all-reduced in buckets, then divided by
//!   `P`), as PyTorch's DistributedDataParallel does;
//! - expert shards: the all-to-all's backward already brought every rank's
//!   contribution, the sum of `P` per-rank losses, so they are divided by
//!   `P`.

use crate::optimizer::scale_to_norm;
use moe_aten::dist::{Group, ReduceOp};
use moe_core::{MoeError, Result};
use moe_models::CausalLm;
use moe_routers::RoutingStats;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{nn, Kind, Tensor};

/// Elements per all-reduce bucket (4 Mi f32, 16 MiB; DDP's default bucket
/// is 25 MiB).
const BUCKET_ELEMENTS: i64 = 4 << 20;

/// A seed stride between ranks larger than any run's steps, so that the
/// ranks' streams of `seed + step` never meet.
const RANK_SEED_STRIDE: i64 = 1_000_003;

/// The seed of step `step`'s micro-batch `micro` on rank `rank`: libtorch's
/// generator is re-seeded with it before the batch is drawn, so the ranks
/// draw different batches, a resumed run draws what the uninterrupted one
/// drew, and one process can draw the global batch of `P` ranks part by
/// part ([`crate::Trainer::with_simulated_ranks`]).
pub fn rank_seed(seed: i64, step: i64, micro: i64, rank: i64) -> i64 {
    seed + step + RANK_SEED_STRIDE * (rank + 1) + 7_919 * micro
}

/// The ranks a [`crate::Trainer`] runs on and what each variable is.
#[derive(Debug, Clone)]
pub struct DataParallel {
    group: Arc<Mutex<Group>>,
    rank: i64,
    size: i64,
    /// The names of the variables that are expert shards, as the model's
    /// layers register them ([`CausalLm::expert_shards`]).
    expert_shards: Arc<BTreeSet<String>>,
}

impl DataParallel {
    /// Training `model`, whose variables are those of `vs`, over `group`
    /// (the group its expert-parallel layers use, or any group for a model
    /// without them). Its expert shards are the variables its layers
    /// register ([`CausalLm::expert_shards`]): their gradients are scaled,
    /// not averaged, and checkpoints gather them; every other variable is
    /// replicated.
    pub fn new(
        group: Arc<Mutex<Group>>,
        vs: &nn::VarStore,
        model: &(impl CausalLm + ?Sized),
    ) -> Self {
        let (rank, size) = {
            let g = lock(&group);
            (g.rank(), g.size())
        };
        let shards = model.expert_shards();
        let is_shard = |t: &Tensor| {
            shards
                .iter()
                .any(|s| s.data_ptr() == t.data_ptr() && s.size() == t.size())
        };
        let expert_shards = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| is_shard(t))
            .map(|(name, _)| name)
            .collect();
        DataParallel {
            group,
            rank,
            size,
            expert_shards: Arc::new(expert_shards),
        }
    }

    /// Whether the variable `name` is an expert shard (registered by its
    /// layer, see [`DataParallel::new`]).
    pub fn is_expert_shard(&self, name: &str) -> bool {
        self.expert_shards.contains(name)
    }

    /// This rank.
    pub fn rank(&self) -> i64 {
        self.rank
    }

    /// The number of ranks `P`.
    pub fn world_size(&self) -> i64 {
        self.size
    }

    fn group(&self) -> MutexGuard<'_, Group> {
        lock(&self.group)
    }

    /// Copies rank 0's replicated variables to every rank (expert shards
    /// differ by design).
    pub fn broadcast_parameters(&self, variables: &[(String, Tensor)]) -> Result<()> {
        let replicated: Vec<Tensor> = variables
            .iter()
            .filter(|(name, _)| !self.is_expert_shard(name))
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let device = self.group().device();
        for bucket in buckets(&replicated) {
            let mut flat = flatten(bucket, device);
            self.group().broadcast_(&mut flat, 0)?;
            unflatten_into(&flat, bucket, |dst, src| dst.copy_(src));
        }
        Ok(())
    }

    /// Averages the gradients of the replicated variables over the ranks
    /// and divides the expert shards' by `P` (see the module docs). A
    /// replicated variable without a gradient on this rank takes part with
    /// zeros, so that every rank's buckets line up.
    pub fn reduce_gradients(&self, variables: &[(String, Tensor)]) -> Result<()> {
        let p = self.size as f64;
        let mut replicated = Vec::new();
        for (name, var) in variables.iter().filter(|(_, v)| v.requires_grad()) {
            if !var.grad().defined() {
                // Defines a zero gradient (the variable took no part here).
                moe_aten::backward(&(var.sum(Kind::Float) * 0.0))?;
            }
            if self.is_expert_shard(name) {
                tch::no_grad(|| {
                    let _ = var.grad().g_div_scalar_(p);
                });
            } else {
                replicated.push(var.grad());
            }
        }
        let device = self.group().device();
        for bucket in buckets(&replicated) {
            let mut flat = flatten(bucket, device);
            self.group().all_reduce_(&mut flat, ReduceOp::Sum)?;
            let mean = flat / p;
            unflatten_into(&mean, bucket, |dst, src| dst.copy_(src));
        }
        Ok(())
    }

    /// Clips the gradients to a global norm of `max_norm` over every rank's
    /// variables (replicated ones counted once, every rank's expert shards
    /// added up), as one process holding the whole model would; returns the
    /// norm before clipping.
    pub fn clip_grad_norm(&self, variables: &[(String, Tensor)], max_norm: f64) -> Result<Tensor> {
        let device = self.group().device();
        let sum_sq = |expert: bool| {
            variables
                .iter()
                .filter(|(name, v)| self.is_expert_shard(name) == expert && v.grad().defined())
                .map(|(_, v)| v.grad().to_kind(Kind::Float).square().sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, device)), |a, b| {
                    a + b.to_device(device)
                })
        };
        let mut experts = sum_sq(true).reshape([1]);
        self.group().all_reduce_(&mut experts, ReduceOp::Sum)?;
        let total = (sum_sq(false) + experts.squeeze()).sqrt();
        let grads: Vec<Tensor> = variables
            .iter()
            .map(|(_, v)| v.grad())
            .filter(Tensor::defined)
            .collect();
        scale_to_norm(&grads, &total, max_norm);
        Ok(total)
    }

    /// The trainable parameters of the whole model, which no rank holds
    /// alone: every replicated variable once, plus the expert shards of
    /// every rank (each holds `E / P` experts of each bank),
    ///
    /// ```text
    /// total = sum(replicated numel) + sum over ranks r of sum(expert shard numel on r)
    /// ```
    ///
    /// counting the variables that require a gradient (a `VarStore`'s
    /// trainable ones, as [`crate::parameter_count`] does). A collective:
    /// one all-reduce of this rank's expert count. It equals
    /// [`crate::parameter_count`] of the single-process model, from which
    /// the active parameters per token follow
    /// ([`moe_models::LmConfig::active_params`]).
    pub fn global_parameter_count(&self, variables: &[(String, Tensor)]) -> Result<i64> {
        let (mut replicated, mut experts) = (0i64, 0i64);
        for (name, var) in variables.iter().filter(|(_, v)| v.requires_grad()) {
            let n = var.numel() as i64;
            match self.is_expert_shard(name) {
                true => experts += n,
                false => replicated += n,
            }
        }
        let group = self.group();
        let mut all = Tensor::from_slice(&[experts]).to_device(group.device());
        group.all_reduce_(&mut all, ReduceOp::Sum)?;
        Ok(replicated + all.to_device(tch::Device::Cpu).int64_value(&[0]))
    }

    /// The mean over the ranks of a scalar (a step's loss).
    pub fn mean(&self, value: &Tensor) -> Result<Tensor> {
        let mut v = value
            .detach()
            .to_kind(Kind::Double)
            .to_device(self.group().device())
            .reshape([1]);
        self.group().all_reduce_(&mut v, ReduceOp::Sum)?;
        Ok((v / self.size as f64).squeeze().to_device(value.device()))
    }

    /// The whole model's variables on every rank: each expert shard
    /// `[E / P, ...]` gathered into its bank `[E, ...]` (rank order is
    /// expert order), the replicated variables as they are. A collective.
    pub fn gather_variables(
        &self,
        variables: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        variables
            .iter()
            .map(|(name, t)| {
                if !self.is_expert_shard(name) {
                    return Ok((name.clone(), t.shallow_clone()));
                }
                let group = self.group();
                let gathered = group.all_gather(&t.detach().to_device(group.device()))?;
                let size = self.whole_size(name, t);
                Ok((name.clone(), gathered.reshape(size.as_slice())))
            })
            .collect()
    }

    /// The size of the whole model's variable of which this rank holds
    /// `t`: an expert shard `[E / P, ...]` stands for `[E, ...]`, a
    /// replicated variable for itself. No communication.
    pub fn whole_size(&self, name: &str, t: &Tensor) -> Vec<i64> {
        let mut size = t.size();
        if self.is_expert_shard(name) {
            size[0] *= self.size;
        }
        size
    }

    /// This rank's slice of whole-model `values` (the inverse of
    /// [`DataParallel::gather_variables`]).
    pub fn shard_of(&self, name: &str, value: &Tensor) -> Result<Tensor> {
        if !self.is_expert_shard(name) {
            return Ok(value.shallow_clone());
        }
        let rows = value.size()[0];
        if rows % self.size != 0 {
            return Err(MoeError::config(format!(
                "{name}: {rows} experts do not split over {} ranks",
                self.size
            )));
        }
        let share = rows / self.size;
        Ok(value.narrow(0, self.rank * share, share))
    }

    /// Routing statistics over every rank: the tokens per expert summed
    /// (the other figures stay this rank's, see [`RoutingStats::with_counts`]).
    pub fn global_routing_stats(&self, stats: Vec<RoutingStats>) -> Result<Vec<RoutingStats>> {
        stats
            .into_iter()
            .map(|s| {
                let group = self.group();
                let mut counts = Tensor::from_slice(&s.tokens_per_expert).to_device(group.device());
                group.all_reduce_(&mut counts, ReduceOp::Sum)?;
                Ok(s.with_counts(Vec::try_from(&counts.to_device(tch::Device::Cpu))?))
            })
            .collect()
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.group().barrier()
    }
}

fn lock(group: &Mutex<Group>) -> MutexGuard<'_, Group> {
    group
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Consecutive runs of tensors of at most [`BUCKET_ELEMENTS`] elements (a
/// larger tensor is a bucket of its own), of one dtype each.
fn buckets(tensors: &[Tensor]) -> Vec<&[Tensor]> {
    let mut out = Vec::new();
    let (mut start, mut elements) = (0, 0i64);
    for (i, t) in tensors.iter().enumerate() {
        let n = t.numel() as i64;
        let kind_changes = i > start && t.kind() != tensors[start].kind();
        if i > start && (elements + n > BUCKET_ELEMENTS || kind_changes) {
            out.push(&tensors[start..i]);
            start = i;
            elements = 0;
        }
        elements += n;
    }
    if start < tensors.len() {
        out.push(&tensors[start..]);
    }
    out
}

/// The tensors of a bucket as one flat tensor on the group's `device`.
fn flatten(bucket: &[Tensor], device: tch::Device) -> Tensor {
    let parts: Vec<Tensor> = bucket
        .iter()
        .map(|t| t.detach().reshape([-1]).to_device(device))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Writes the pieces of `flat` back into the bucket's tensors with `write`.
fn unflatten_into(flat: &Tensor, bucket: &[Tensor], write: impl Fn(&mut Tensor, &Tensor)) {
    let mut offset = 0;
    tch::no_grad(|| {
        for t in bucket {
            let n = t.numel() as i64;
            let piece = flat
                .narrow(0, offset, n)
                .view(t.size().as_slice())
                .to_device(t.device())
                .to_kind(t.kind());
            write(&mut t.shallow_clone(), &piece);
            offset += n;
        }
    });
}
