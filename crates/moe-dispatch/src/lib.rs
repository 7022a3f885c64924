//! Dispatch strategies of `moe-layers`: given tokens `x` (`[N, d]`), a
//! [`Routing`](moe_core::Routing) and an [`ExpertBank`](moe_experts::ExpertBank),
//! compute
//!
//! `y_n = sum_{j < k} w[n, j] * FFN_{i[n, j]}(x_n)`
//!
//! Every strategy implements [`Dispatch`] and computes the same `y`; they
//! differ in how much work and host synchronisation it costs.
//! [`DenseReference`] runs every expert on every token and is the oracle the
//! sparse strategies are tested against.

mod config;
mod dense_reference;
mod dispatch;
mod mask_loop;

pub use config::DispatchKind;
pub use dense_reference::DenseReference;
pub use dispatch::Dispatch;
pub use mask_loop::MaskLoop;
