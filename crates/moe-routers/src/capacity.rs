use crate::config::check_capacity_factor;
use moe_core::{expert_capacity, MoeError, Result, Routing};

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
/// [`Routing::dropped`] and `C` is recorded in [`Routing::capacity`].
///
/// Done as a post-processing of the routing ([`crate::RouterConfig::finish`]),
/// so every dispatch strategy stays correct unchanged: a zero weight
/// contributes nothing. The capacity strategy of `moe-dispatch` reads `C`
/// to size its buffers.
pub fn apply_capacity(routing: Routing, capacity_factor: f64) -> Result<Routing> {
    check_capacity_factor(capacity_factor)?;
    let Some(k) = routing.top_k else {
        return Err(MoeError::config(
            "a capacity limit applies to token-choice routings; an expert-choice routing \
             is balanced by construction, its capacity set by the gate's capacity_factor",
        ));
    };
    let (n, e) = (routing.num_tokens(), routing.num_experts);
    let capacity = expert_capacity(n, k, e, capacity_factor);
    let dropped = routing.slot_positions().ge(capacity);
    let weight = routing.weight.masked_fill(&dropped, 0.0);
    Ok(Routing {
        weight,
        dropped: Some(dropped),
        capacity: Some(capacity),
        ..routing
    })
}
