use super::groups;
use moe_core::{Result, Routing};
use tch::{Kind, Tensor};

/// `f_i = N'/(K' T) * count_i` per group of `T` tokens, `[G, E]` (float):
/// the load of expert `i` relative to a perfectly even load (1 each).
/// `count_i` counts the slots of the group's tokens, dropped ones included
/// (the router's choice); `K'` is the slots per token, `k` under token
/// choice and `S / N` under expert choice.
pub fn expert_fractions(routing: &Routing, group: Option<i64>) -> Result<Tensor> {
    let (g, t) = groups(routing, group)?;
    let e = routing.num_experts;
    let group_of_slot = routing.token.divide_scalar_mode(t, "trunc");
    let counts = Tensor::zeros([g * e], (Kind::Float, routing.expert.device()))
        .scatter_add(
            0,
            &(group_of_slot * e + &routing.expert),
            &routing.expert.ones_like().to_kind(Kind::Float),
        )
        .view([g, e]);
    Ok(counts * (e as f64 / (slots_per_token(routing) * t as f64)))
}

/// `K'`, the mean slots per token: `k` under token choice.
fn slots_per_token(routing: &Routing) -> f64 {
    match routing.top_k {
        Some(k) => k as f64,
        None => routing.num_slots() as f64 / routing.num_tokens().max(1) as f64,
    }
}

/// The expert-level balance loss, without its coefficient:
///
/// `L = sum_i f_i P_i`, `f_i = N'/(K'T) count_i`, `P_i = 1/T sum_t s_{i,t}`
///
/// (DeepSeekMoE, arXiv 2401.06066, eq. 12-14, `N'` routed experts, `K'`
/// chosen per token, `T` tokens). It is the Switch Transformer loss
/// (arXiv 2101.03961, eq. 4-6) written differently: with `f^S_i` the
/// fraction of routed slots sent to expert `i` (counted over `T K'` slots),
/// `alpha E sum_i f^S_i P_i = alpha sum_i f_i P_i`. Only `P` carries a
/// gradient. Its minimum under an even load and uniform probabilities is 1.
///
/// `group = Some(T)` computes it per sequence of `T` consecutive tokens and
/// averages over sequences (DeepSeek-V3's sequence-wise variant, eq. 17-20);
/// `None` treats the `N` tokens as one group.
pub fn load_balance_loss(routing: &Routing, group: Option<i64>) -> Result<Tensor> {
    let f = expert_fractions(routing, group)?;
    let (g, t) = groups(routing, group)?;
    let p = routing
        .probs
        .to_kind(Kind::Float)
        .view([g, t, routing.num_experts])
        .mean_dim(1, false, Kind::Float);
    Ok((f * p)
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float))
}

/// [`load_balance_loss`] (batch-level) on one rank of an expert-parallel
/// group of `world_size` ranks that route `T` tokens each: the loads `f_i`
/// count the slots of every rank (`global_counts`, `[E]`, an all-reduce of
/// [`Routing::expert_counts`]), the probabilities `P_i` this rank's tokens.
/// The mean over the ranks of this loss is the loss of the whole batch of
/// `world_size T` tokens, and so is the mean of its gradients, which data
/// parallelism takes.
pub fn load_balance_loss_over_ranks(
    routing: &Routing,
    global_counts: &Tensor,
    world_size: i64,
) -> Tensor {
    let e = routing.num_experts;
    let tokens = (routing.num_tokens() * world_size).max(1) as f64;
    let f = global_counts.to_kind(Kind::Float) * (e as f64 / (slots_per_token(routing) * tokens));
    let p = routing
        .probs
        .to_kind(Kind::Float)
        .mean_dim(0, false, Kind::Float);
    (f * p).sum(Kind::Float)
}
