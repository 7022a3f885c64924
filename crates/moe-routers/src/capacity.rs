use crate::{Router, RouterConfig};
use moe_core::{expert_capacity, MoeError, Result, Routing};
use tch::Tensor;

/// Expert capacity (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961,
/// §2.2; makeMoE's capacity variant): each expert processes at most
///
/// `C = max(1, floor(N k / E * capacity_factor))` ([`expert_capacity`])
///
/// slots of a batch of `N` tokens. Slots are served in token order (token
/// `n`'s `k` choices before token `n + 1`'s); an expert's slots beyond its
/// first `C` are dropped: their weight becomes 0 and the other weights of
/// the token are not renormalised (the token keeps only what its other
/// experts and the residual path give it). Dropped slots are marked in
/// [`Routing::dropped`].
///
/// Done as a post-processing of the routing, so every dispatch strategy
/// stays correct unchanged: a zero weight contributes nothing.
pub fn apply_capacity(routing: Routing, capacity_factor: f64) -> Result<Routing> {
    if !(capacity_factor > 0.0 && capacity_factor.is_finite()) {
        return Err(MoeError::config(format!(
            "capacity_factor must be a positive number, got {capacity_factor}"
        )));
    }
    let (n, k, e) = (routing.num_tokens(), routing.top_k(), routing.num_experts);
    let capacity = expert_capacity(n, k, e, capacity_factor);
    let dropped = routing.slot_positions().ge(capacity).view([n, k]);
    let weights = routing.weights.masked_fill(&dropped, 0.0);
    Ok(Routing {
        weights,
        dropped: Some(dropped),
        ..routing
    })
}

/// A router whose routing passes through [`apply_capacity`].
#[derive(Debug)]
pub struct CapacityLimited {
    inner: Box<dyn Router>,
    capacity_factor: f64,
}

impl CapacityLimited {
    pub fn new(inner: Box<dyn Router>, capacity_factor: f64) -> Result<Self> {
        if !(capacity_factor > 0.0 && capacity_factor.is_finite()) {
            return Err(MoeError::config(format!(
                "capacity_factor must be a positive number, got {capacity_factor}"
            )));
        }
        Ok(CapacityLimited {
            inner,
            capacity_factor,
        })
    }

    pub fn capacity_factor(&self) -> f64 {
        self.capacity_factor
    }
}

impl Router for CapacityLimited {
    fn route(&self, x: &Tensor, train: bool) -> Result<Routing> {
        apply_capacity(self.inner.route(x, train)?, self.capacity_factor)
    }

    fn after_step(&self, routing: &Routing) -> Result<()> {
        self.inner.after_step(routing)
    }

    fn config(&self) -> &RouterConfig {
        self.inner.config()
    }
}
