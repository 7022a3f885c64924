//! Routers of `moe-layers`: given a flat batch of tokens `x` (`[N, d]`), a
//! router picks `k` of `E` experts per token and the weight of each, or
//! (expert choice, [`expert_choice`]) each expert picks its tokens, as a
//! [`Routing`](moe_core::Routing).
//!
//! All routers implement [`Router`]: a [`RouterConfig`] (a [`Gate`] with its
//! settings, plus the gate bias, the routed scaling factor and the capacity
//! factor) and the sizes ([`RouterDims`]) build one at run time, and the MoE
//! layer never names a concrete type. They share two selection mechanisms
//! ([`top_k_softmax`], [`top_k_of_affinities`]) and DeepSeek's group
//! limit ([`group_limited_selection`]); an expert-capacity limit
//! ([`apply_capacity`]) post-processes any routing. The [`balance`] losses
//! and [`RoutingStats`] read routings.
#![warn(missing_docs)]

mod attention;
mod aux_free;
pub mod balance;
mod capacity;
mod config;
mod expert_choice;
mod gating;
mod noise;
mod noisy_top_k;
mod router;
mod stats;
mod top_k;

pub use attention::AttentionRouter;
pub use aux_free::AuxFreeSigmoidRouter;
pub use balance::BalanceLossConfig;
pub use capacity::apply_capacity;
pub use config::{
    build_router, check_top_k, FromRouterSpec, Gate, RouterConfig, RouterDims, RouterSpec,
    WeightsOn, DEFAULT_BIAS_UPDATE_RATE,
};
pub use expert_choice::{
    expert_choice, expert_choice_capacity, ExpertChoiceRouter, ExpertChoiceScope,
};
pub(crate) use gating::check_groups;
pub use gating::{
    group_limited_selection, softmax_top_k, top_k_of_affinities, top_k_softmax, GroupScore,
};
pub use noise::with_given_noise;
pub use noisy_top_k::NoisyTopKRouter;
pub use router::Router;
pub use stats::{mean_probs, RoutingStats};
pub use top_k::TopKRouter;
