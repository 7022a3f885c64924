//! Dispatch strategies of `moe-layers`: given tokens `x` (`[N, d]`), a
//! [`Routing`](moe_core::Routing) and an [`ExpertBank`](moe_experts::ExpertBank),
//! compute
//!
//! `y_n = sum_{s : token[s] = n} weight[s] * FFN_{expert[s]}(x_n)`
//!
//! over the routing's slots: `k` per token under token choice, any number
//! under expert choice, which every strategy takes alike. Every strategy
//! implements [`Dispatch`] and computes the same `y` (the capacity strategy
//! drops overflowing slots by design); they differ in how much work and
//! host synchronisation it costs:
//!
//! | strategy | work | host syncs per layer | source |
//! |---|---|---|---|
//! | [`MaskLoop`] | k/E of dense + E masks | E | makeMoE |
//! | [`IndexedLoop`] | k/E of dense + E gathers | E | Mixtral (HF) |
//! | [`Grouped`] | k/E of dense, 2 grouped GEMMs | 0 | MegaBlocks |
//! | [`Capacity`] | factor x k/E of dense, batched matmuls | 0 | GShard/Switch |
//! | [`DenseReference`] | all experts on all tokens | 0 | tests |
//!
//! [`DispatchKind::Auto`] picks one by device (see its docs).
//!
//! [`ExpertParallel`] computes the same `y` with the experts spread over
//! the ranks of a c10d process group (`moe_aten::dist::Group`): tokens go
//! to the rank of their expert and back with all-to-all exchanges. It needs
//! the `dist` feature (the C++ shim with c10d); without it the type exists
//! but has no values, so layers built with `None` for it compile alike.
#![warn(missing_docs)]

mod auto;
mod capacity;
mod config;
mod dense_reference;
mod dispatch;
#[cfg(feature = "dist")]
mod expert_parallel;
mod grouped;
mod indexed_loop;
mod mask_loop;
#[cfg(not(feature = "dist"))]
mod no_dist;
mod sorted_slots;

pub use auto::Auto;
pub use capacity::{Capacity, CapacityPlan};
pub use config::{DispatchKind, DispatchSpec, DEFAULT_CAPACITY_FACTOR};
pub use dense_reference::DenseReference;
pub use dispatch::Dispatch;
#[cfg(feature = "dist")]
pub use expert_parallel::{ExchangeMode, ExchangeStats, ExpertParallel, ExpertParallelism};
pub use grouped::{grouped_mm_supported, Grouped};
pub use indexed_loop::IndexedLoop;
pub use mask_loop::MaskLoop;
#[cfg(not(feature = "dist"))]
pub use no_dist::{ExpertParallel, ExpertParallelism};
pub use sorted_slots::SortedSlots;
