//! Routers of `moe-layers`: given a flat batch of tokens `x` (`[N, d]`), a
//! router picks `k` of `E` experts per token and the weight of each, as a
//! [`Routing`](moe_core::Routing).
//!
//! All routers implement [`Router`], so a [`RouterConfig`] chooses one at
//! run time and the MoE layer never names a concrete type.

mod config;
mod noisy_top_k;
mod router;
mod top_k;

pub use config::{RouterConfig, RouterKind};
pub use noisy_top_k::NoisyTopKRouter;
pub use router::{top_k_softmax, Router};
pub use top_k::TopKRouter;
