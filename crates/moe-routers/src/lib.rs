//! Routers of `moe-layers`: given a flat batch of tokens `x` (`[N, d]`), a
//! router picks `k` of `E` experts per token and the weight of each, as a
//! [`Routing`](moe_core::Routing).
//!
//! All routers implement [`Router`], so a [`RouterConfig`] chooses one at
//! run time and the MoE layer never names a concrete type. They share two
//! selection mechanisms ([`top_k_softmax`], [`top_k_of_affinities`]); an
//! expert-capacity limit ([`apply_capacity`]) post-processes any routing.
//! The [`balance`] losses and [`RoutingStats`] read routings.

mod attention;
mod aux_free;
pub mod balance;
mod capacity;
mod config;
mod deepseek_moe;
mod gating;
mod noisy_top_k;
mod router;
mod stats;
mod top_k;

pub use attention::AttentionRouter;
pub use aux_free::AuxFreeSigmoidRouter;
pub use balance::BalanceLossConfig;
pub use capacity::{apply_capacity, CapacityLimited};
pub use config::{RouterConfig, RouterKind};
pub use deepseek_moe::DeepSeekMoeRouter;
pub use gating::{top_k_of_affinities, top_k_softmax};
pub use noisy_top_k::NoisyTopKRouter;
pub use router::Router;
pub use stats::{mean_probs, RoutingStats};
pub use top_k::TopKRouter;
