use moe_core::Routing;
use tch::{Kind, Tensor};

/// Router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, eq. 5),
/// without its coefficient:
///
/// `L_z = 1/N sum_n (log sum_i exp(x_{n,i}))^2`,
///
/// over the router logits `x`. It keeps the logits small, which keeps the
/// router's softmax numerically stable.
pub fn router_z_loss(routing: &Routing) -> Tensor {
    routing
        .logits
        .to_kind(Kind::Float)
        .logsumexp([-1], false)
        .square()
        .mean(Kind::Float)
}
