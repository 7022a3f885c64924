use moe_core::{MoeError, Result, Routing};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How evenly a layer's router spread its tokens, over one or more routings
/// (e.g. the batches of an evaluation).
///
/// With `c_i` the slots routed to expert `i` and `mean = sum_i c_i / E`:
/// `cv = std(c) / mean` (population std), `max_violation = (max_i c_i - mean) / mean`
/// (the "MaxVio" of Wang et al. 2024, arXiv 2408.15664, §4.1), both 0 under a
/// perfectly even load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    /// Routed slots per expert, `c_i` (dropped slots included).
    pub tokens_per_expert: Vec<i64>,
    /// Coefficient of variation of `c`.
    pub cv: f64,
    /// `(max c - mean c) / mean c`.
    pub max_violation: f64,
    /// Fraction of slots dropped by a capacity limit (0 without one).
    pub dropped_fraction: f64,
    /// Fraction of tokens that no expert processes: under expert choice
    /// the tokens no expert chose, under a capacity limit those whose every
    /// slot was dropped (0 for dropless token choice). Such a token passes
    /// the layer on its residual (and shared experts) alone. Absent from
    /// statistics written before it existed, which read as 0.
    #[serde(default)]
    pub unrouted_fraction: f64,
    /// Mean over tokens of the entropy of the router probabilities,
    /// `-sum_i p_i ln p_i` (nats; `ln E` when uniform).
    pub mean_entropy: f64,
}

impl RoutingStats {
    /// Statistics of the union of `routings`, which must share `E`.
    pub fn from_routings(routings: &[&Routing]) -> Result<Self> {
        let first = routings
            .first()
            .ok_or_else(|| MoeError::config("routing statistics need at least one routing"))?;
        let e = first.num_experts;
        if let Some(r) = routings.iter().find(|r| r.num_experts != e) {
            return Err(MoeError::config(format!(
                "routing statistics over routings with different expert counts ({e} and {})",
                r.num_experts
            )));
        }
        let mut counts = vec![0i64; e as usize];
        let (mut slots, mut dropped, mut tokens, mut unrouted) = (0i64, 0i64, 0i64, 0i64);
        let mut entropy_sum = 0f64;
        for r in routings {
            let c = Vec::<i64>::try_from(r.expert_counts())?;
            counts.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
            slots += r.num_slots();
            if let Some(d) = &r.dropped {
                dropped += d.sum(Kind::Int64).int64_value(&[]);
            }
            tokens += r.num_tokens();
            unrouted += unrouted_tokens(r);
            let p = r.probs.to_kind(Kind::Double);
            // p ln p -> 0 as p -> 0: the clamp only avoids 0 * -inf.
            let plogp = &p * p.clamp_min(1e-30).log();
            entropy_sum -= plogp.sum(Kind::Double).double_value(&[]);
        }
        let (cv, max_violation) = load_spread(&counts);
        let fraction = |part: f64, whole: i64| if whole > 0 { part / whole as f64 } else { 0.0 };
        Ok(RoutingStats {
            cv,
            max_violation,
            dropped_fraction: fraction(dropped as f64, slots),
            unrouted_fraction: fraction(unrouted as f64, tokens),
            mean_entropy: fraction(entropy_sum, tokens),
            tokens_per_expert: counts,
        })
    }

    /// Statistics of one routing.
    pub fn of(routing: &Routing) -> Result<Self> {
        Self::from_routings(&[routing])
    }
}

/// Tokens of `routing` without a kept slot.
fn unrouted_tokens(routing: &Routing) -> i64 {
    let kept = match &routing.dropped {
        Some(d) => d.logical_not().to_kind(Kind::Int64),
        None => routing.expert.ones_like().to_kind(Kind::Int64),
    };
    let per_token = Tensor::zeros([routing.num_tokens()], (Kind::Int64, kept.device()))
        .scatter_add(0, &routing.token, &kept);
    per_token.eq(0).sum(Kind::Int64).int64_value(&[])
}

/// The mean router probability of each expert, `[E]`: the `P_i` of the
/// balance losses (used by tests and plots).
pub fn mean_probs(routing: &Routing) -> Tensor {
    routing
        .probs
        .to_kind(Kind::Float)
        .mean_dim(0, false, Kind::Float)
}

/// The coefficient of variation of per-expert counts and the relative
/// excess of the busiest expert over the mean, `(std / mean, (max - mean) /
/// mean)`; zeros when no token was routed.
fn load_spread(counts: &[i64]) -> (f64, f64) {
    let e = counts.len().max(1) as f64;
    let mean = counts.iter().sum::<i64>() as f64 / e;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / e;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let relative = |x: f64| if mean > 0.0 { x / mean } else { 0.0 };
    (relative(var.sqrt()), relative(max - mean))
}

impl RoutingStats {
    /// These statistics with the load of other ranks added: `counts` are
    /// the tokens per expert over every rank (expert parallelism), from
    /// which the coefficient of variation and the busiest expert's excess
    /// are recomputed; the dropped fraction and the entropy stay this
    /// rank's (means over tokens, which the ranks share alike).
    pub fn with_counts(mut self, counts: Vec<i64>) -> Self {
        (self.cv, self.max_violation) = load_spread(&counts);
        self.tokens_per_expert = counts;
        self
    }
}
