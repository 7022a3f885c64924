use crate::capacity::{combine_rows, fill_buffer};
use crate::dispatch::gather_weighted_sum;
use crate::grouped::{run_segments, Segments};
use crate::{Capacity, SortedSlots};
use moe_aten::dist::{Group, GroupOptions, ReduceOp};
use moe_core::{MoeError, Result, Routing};
use moe_experts::ExpertBank;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tch::{Kind, Tensor};

/// How an expert-parallel layer exchanges tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum ExchangeMode {
    /// Every routed slot travels (no token dropped): the ranks first
    /// exchange their per-expert counts and read them on the host once per
    /// layer to size the uneven all-to-all (Megatron-LM's
    /// `MoEAlltoAllTokenDispatcher`).
    #[default]
    Dropless,
    /// Every rank sends each expert exactly `C` rows (the router's capacity,
    /// [`Routing::capacity`]; slots past it are dropped, empty rows padded):
    /// equal splits, no host read, shapes fixed by `N, k, E, d` (GShard's
    /// dispatch). Every rank must route the same number of tokens.
    Capacity,
}

impl std::str::FromStr for ExchangeMode {
    type Err = MoeError;

    /// `dropless` or `capacity`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dropless" => Ok(ExchangeMode::Dropless),
            "capacity" => Ok(ExchangeMode::Capacity),
            other => Err(MoeError::config(format!(
                "unknown exchange mode `{other}`: expected dropless or capacity"
            ))),
        }
    }
}

/// How a model spreads the experts of every MoE layer over one group's
/// ranks: [`ExpertParallelism::layer`] gives each layer its
/// [`ExpertParallel`].
#[derive(Debug, Clone)]
pub struct ExpertParallelism {
    /// The ranks the experts are spread over.
    pub group: Arc<Mutex<Group>>,
    /// How tokens are exchanged.
    pub mode: ExchangeMode,
}

impl ExpertParallelism {
    /// This process as one rank of the group its launcher describes
    /// (torchrun's `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`;
    /// [`Group::from_env`]), over Gloo with CPU tensors, exchanging tokens
    /// by `mode`.
    pub fn from_env(mode: ExchangeMode) -> Result<Self> {
        let group = Group::from_env(&GroupOptions::default())?;
        Ok(ExpertParallelism {
            group: Arc::new(Mutex::new(group)),
            mode,
        })
    }

    /// The split of a layer of `num_experts` experts (a multiple of the
    /// group's size).
    pub fn layer(&self, num_experts: i64) -> Result<ExpertParallel> {
        ExpertParallel::new(self.group.clone(), num_experts, self.mode)
    }

    /// This process's rank.
    pub fn rank(&self) -> i64 {
        lock(&self.group).rank()
    }

    /// The group's size.
    pub fn world_size(&self) -> i64 {
        lock(&self.group).size()
    }
}

/// Expert parallelism (GShard, arXiv 2006.16668; DeepSpeed-MoE, arXiv
/// 2201.05596; Megatron-LM's token dispatcher): the `E` experts of a layer
/// are split over the `P` ranks of a [`Group`], `L = E / P` consecutive
/// experts each (rank `r` holds experts `r L .. (r + 1) L`). Each rank
/// routes its own tokens over all `E` experts, then
///
/// 1. sorts its slots (`N k` under token choice, any number per token
///    under expert choice) by expert, so that the slots bound for each rank
///    are contiguous;
/// 2. (dropless) exchanges its per-expert slot counts (an all-to-all of
///    `[P, L]` counts) and reads them once on the host;
/// 3. sends each rank the rows of its experts in one uneven all-to-all;
/// 4. runs its `L` experts on what it received, sorted by expert, with the
///    grouped dispatch's GEMMs ([`crate::Grouped`]);
/// 5. sends the results back with the reverse all-to-all;
/// 6. combines each token's outputs weighted by its gate.
///
/// Every step is differentiable (the all-to-all's backward is the reverse
/// exchange), so the gradient of an expert's weights sums over the tokens
/// of every rank routed to it, and the gradient of the input is the one a
/// single process holding all experts computes. The router, attention and
/// every other weight are replicated: the caller averages their gradients
/// over the ranks (data parallelism). [`ExpertParallel::global_counts`]
/// sums the per-expert counts over the ranks, for balance losses and
/// routing statistics over the whole batch.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    group: Arc<Mutex<Group>>,
    num_experts: i64,
    mode: ExchangeMode,
    stats: Arc<Mutex<ExchangeStats>>,
}

/// What an expert-parallel layer's forward passes have cost on this rank
/// since it was built (or [`ExpertParallel::reset_stats`]): wall time in
/// the token exchanges (counts and payload, there and back) and in the local
/// experts, and the bytes this rank sent. The backward passes mirror the
/// exchanges (same bytes, reversed) inside autograd, not counted here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ExchangeStats {
    /// Forward passes.
    pub calls: u64,
    /// Seconds in all-to-all exchanges (and waiting for the peers).
    pub exchange_s: f64,
    /// Seconds running this rank's experts.
    pub expert_s: f64,
    /// Bytes of token rows this rank sent (to other ranks and itself).
    pub bytes_sent: u64,
}

impl ExpertParallel {
    /// Splits `num_experts` experts over `group`'s ranks; `num_experts`
    /// must be a positive multiple of the group's size.
    pub fn new(group: Arc<Mutex<Group>>, num_experts: i64, mode: ExchangeMode) -> Result<Self> {
        let size = lock(&group).size();
        if num_experts < 1 || num_experts % size != 0 {
            return Err(MoeError::config(format!(
                "expert parallelism splits the experts evenly over the ranks: {num_experts} \
                 experts over {size} ranks (num_experts % world_size must be 0)"
            )));
        }
        Ok(ExpertParallel {
            group,
            num_experts,
            mode,
            stats: Arc::default(),
        })
    }

    /// The group's ranks `P`.
    pub fn world_size(&self) -> i64 {
        self.group().size()
    }

    /// This rank.
    pub fn rank(&self) -> i64 {
        self.group().rank()
    }

    /// The experts of the layer `E`.
    pub fn num_experts(&self) -> i64 {
        self.num_experts
    }

    /// The experts each rank holds, `L = E / P`.
    pub fn local_experts(&self) -> i64 {
        self.num_experts / self.world_size()
    }

    /// The global id of this rank's first expert, `r L`.
    pub fn first_expert(&self) -> i64 {
        self.rank() * self.local_experts()
    }

    /// How tokens are exchanged.
    pub fn mode(&self) -> ExchangeMode {
        self.mode
    }

    /// The exchange and expert time and bytes sent so far (see [`ExchangeStats`]).
    pub fn stats(&self) -> ExchangeStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts counting [`ExchangeStats`] from zero.
    pub fn reset_stats(&self) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = ExchangeStats::default();
    }

    /// Adds one forward pass's figures.
    fn record(&self, exchange_s: f64, expert_s: f64, bytes_sent: i64) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.calls += 1;
        stats.exchange_s += exchange_s;
        stats.expert_s += expert_s;
        stats.bytes_sent += bytes_sent.max(0) as u64;
    }

    /// The group (for the collectives of the training loop).
    pub fn shared_group(&self) -> &Arc<Mutex<Group>> {
        &self.group
    }

    /// The group locked, its size `P` and the experts per rank `L`.
    fn locked_split(&self) -> (MutexGuard<'_, Group>, i64, i64) {
        let group = self.group();
        let p = group.size();
        (group, p, self.num_experts / p)
    }

    /// The group, locked (not re-entrant: a method holding it calls no
    /// other method that locks it).
    fn group(&self) -> MutexGuard<'_, Group> {
        lock(&self.group)
    }

    /// `x: [N, d]` -> `y: [N, d]`, `y_n = sum_{s : token[s] = n} weight[s]
    /// FFN_{expert[s]}(x_n)` with the experts spread over the ranks (each
    /// rank's routing chose among its own tokens); `local` holds this rank's
    /// `L` experts. Every rank of the group must call it (a collective).
    pub fn combine(
        &self,
        x: &Tensor,
        routing: &Routing,
        local: &ExpertBank,
        train: bool,
    ) -> Result<Tensor> {
        if routing.num_experts != self.num_experts || local.num_experts() != self.local_experts() {
            return Err(MoeError::config(format!(
                "expert-parallel layer of {} experts ({} on each rank) got a routing over {} \
                 experts and a bank of {}",
                self.num_experts,
                self.local_experts(),
                routing.num_experts,
                local.num_experts()
            )));
        }
        match self.mode {
            ExchangeMode::Dropless => self.dropless(x, routing, local, train),
            ExchangeMode::Capacity => self.capacity(x, routing, local, train),
        }
    }

    /// The slots each expert got over every rank, `[E]` int64 (an
    /// all-reduce of [`Routing::expert_counts`]).
    pub fn global_counts(&self, routing: &Routing) -> Result<Tensor> {
        let mut counts = routing.expert_counts().to_kind(Kind::Int64).copy();
        self.group().all_reduce_(&mut counts, ReduceOp::Sum)?;
        Ok(counts)
    }

    fn dropless(
        &self,
        x: &Tensor,
        routing: &Routing,
        local: &ExpertBank,
        train: bool,
    ) -> Result<Tensor> {
        let (group, p, l) = self.locked_split();
        let slots = SortedSlots::new(routing);
        let xs = x.index_select(0, &slots.token);
        let clock = Instant::now();
        // Counts: sent[e] to expert e; received[s, l] from rank s for local expert l.
        let sent_counts = slots.counts.to_kind(Kind::Int64).view([p, l]);
        let ones = vec![1; p as usize];
        let received = group.all_to_all_unchecked(&sent_counts, &ones, &ones)?;
        let sent: Vec<i64> = Vec::try_from(sent_counts.view([-1]))?;
        let recv: Vec<i64> = Vec::try_from(received.view([-1]))?;
        let l_us = l as usize;
        let block =
            |counts: &[i64], rank: usize| counts[rank * l_us..(rank + 1) * l_us].iter().sum();
        let send_splits: Vec<i64> = (0..p as usize).map(|j| block(&sent, j)).collect();
        let recv_splits: Vec<i64> = (0..p as usize).map(|s| block(&recv, s)).collect();
        let rows = group.all_to_all_unchecked(&xs, &recv_splits, &send_splits)?;
        let mut exchange_s = clock.elapsed().as_secs_f64();

        // Received rows come by source rank, then local expert; the experts
        // want them by local expert: a permutation known from the counts.
        let mut start = vec![0i64; recv.len()];
        let mut acc = 0;
        for (i, &c) in recv.iter().enumerate() {
            start[i] = acc;
            acc += c;
        }
        let mut order = Vec::with_capacity(acc as usize);
        let mut local_counts = vec![0i64; l_us];
        let mut expert_of_row = Vec::with_capacity(acc as usize);
        for (e, local_count) in local_counts.iter_mut().enumerate() {
            for s in 0..p as usize {
                let i = s * l_us + e;
                order.extend(start[i]..start[i] + recv[i]);
                *local_count += recv[i];
                expert_of_row.extend(std::iter::repeat_n(e as i64, recv[i] as usize));
            }
        }
        let device = x.device();
        let order = Tensor::from_slice(&order).to_device(device);
        let counts = Tensor::from_slice(&local_counts).to_device(device);
        let offsets = counts.cumsum(0, Kind::Int).to_kind(Kind::Int);
        let expert = Tensor::from_slice(&expert_of_row).to_device(device);
        let clock = Instant::now();
        let sorted = rows.index_select(0, &order);
        let segments = Segments {
            counts: &counts,
            offsets: &offsets,
            expert: &expert,
        };
        let out = local.output_dropout(run_segments(local, &sorted, &segments), train);
        let expert_s = clock.elapsed().as_secs_f64();
        // Back to the received order, then to the ranks the rows came from.
        let inverse = order.zeros_like().scatter(
            0,
            &order,
            &Tensor::arange(order.size()[0], (Kind::Int64, device)),
        );
        let returned = out.index_select(0, &inverse);
        let clock = Instant::now();
        let back = group.all_to_all_unchecked(&returned, &send_splits, &recv_splits)?;
        exchange_s += clock.elapsed().as_secs_f64();
        let row_bytes = x.size()[1] * x.kind().elt_size_in_bytes() as i64;
        let rows_sent = send_splits.iter().sum::<i64>() + recv_splits.iter().sum::<i64>();
        self.record(exchange_s, expert_s, rows_sent * row_bytes);
        Ok(gather_weighted_sum(
            &back,
            &slots.position,
            &routing.weight,
            routing,
        ))
    }

    fn capacity(
        &self,
        x: &Tensor,
        routing: &Routing,
        local: &ExpertBank,
        train: bool,
    ) -> Result<Tensor> {
        let (group, p, l) = self.locked_split();
        let d = x.size()[1];
        let plan = Capacity.plan(routing);
        let c = plan.capacity;
        // This rank's [E C, d] buffer; equal splits of L C rows to each rank.
        // The splits are checked here: ranks with different capacities
        // (different token counts) would otherwise exchange garbage.
        let buffer = fill_buffer(x, routing, &plan);
        let equal = vec![l * c; p as usize];
        let clock = Instant::now();
        let received = group.all_to_all(&buffer, &equal, &equal)?;
        let mut exchange_s = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let per_expert = received
            .view([p, l, c, d])
            .transpose(0, 1)
            .reshape([l, p * c, d]);
        let out = local.output_dropout(local.batched_ffn(&per_expert), train);
        let back_rows = out
            .view([l, p, c, d])
            .transpose(0, 1)
            .reshape([p * l * c, d]);
        let expert_s = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let back = group.all_to_all_unchecked(&back_rows, &equal, &equal)?;
        exchange_s += clock.elapsed().as_secs_f64();
        let row_bytes = d * x.kind().elt_size_in_bytes() as i64;
        self.record(exchange_s, expert_s, 2 * p * l * c * row_bytes);
        Ok(combine_rows(&back, x, routing, &plan))
    }
}

fn lock(group: &Mutex<Group>) -> MutexGuard<'_, Group> {
    group
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
