use crate::{MoeError, Result};
use tch::{Kind, Tensor};

/// A router's decision for a flat batch of `N` tokens over `E` experts, as
/// `S` slots: slot `s` sends token `token[s]` to expert `expert[s]`, whose
/// output the token receives with weight `weight[s]`.
///
/// Every dispatch strategy reads these three lists, whatever chose them:
///
/// - **token choice** (`top_k = Some(k)`: top-k, noisy top-k, attention,
///   sigmoid gates): each token chooses `k` distinct experts; `S = N k`,
///   slot `s = n k + j` is token `n`'s `j`-th choice (`token[s] = s / k`), and
///   [`Routing::indices`] / [`Routing::weights`] are the `[N, k]` views;
/// - **expert choice** (`top_k = None`; Zhou et al. 2022, arXiv 2202.09368):
///   each expert chooses its tokens, so a token has any number of slots,
///   zero included; the slots come in expert order.
///
/// A (token, expert) pair occurs at most once. Balance losses and routing
/// statistics also read `logits`, `probs` and `dropped`.
#[derive(Debug)]
pub struct Routing {
    /// Token of each slot, `[S]` int64 in `0..N`.
    pub token: Tensor,
    /// Expert of each slot, `[S]` int64 in `0..E`.
    pub expert: Tensor,
    /// Weight of each slot, `[S]`; a token-choice routing's `k` weights sum
    /// to 1 for gates that renormalise over the chosen experts (times the
    /// router's routed scaling factor). A slot dropped by an expert-capacity
    /// limit has weight 0.
    pub weight: Tensor,
    /// `Some(k)`: token choice, `k` slots per token in token order (see
    /// above); `None`: expert choice, any number of slots per token.
    pub top_k: Option<i64>,
    /// Router scores over all experts, `[N, E]`, before selection (after
    /// noise, if any was added); the router z-loss reads them.
    pub logits: Tensor,
    /// Router probabilities over all experts, `[N, E]`, rows summing to 1
    /// (`softmax(logits)` for softmax gates, the normalised affinities for a
    /// sigmoid gate): the `P_i` of the balance losses.
    pub probs: Tensor,
    /// Slots removed by an expert-capacity limit, `[S]` bool, or `None`
    /// when no limit was applied.
    pub dropped: Option<Tensor>,
    /// The most slots one expert serves in this batch: the capacity `C`
    /// of a limit that produced `dropped` ([`expert_capacity`]), or the
    /// slots each expert chose under expert choice. `None` without either.
    /// The capacity dispatch strategy sizes its per-expert buffers with it.
    pub capacity: Option<i64>,
    /// Number of experts `E`.
    pub num_experts: i64,
}

/// Expert capacity (GShard, arXiv 2006.16668; Switch Transformer, arXiv
/// 2101.03961 §2.2): the most slots one expert serves for `num_tokens`
/// tokens routed to `k` of `num_experts` experts,
///
/// `C = max(1, floor(N k / E * capacity_factor))`.
pub fn expert_capacity(num_tokens: i64, k: i64, num_experts: i64, capacity_factor: f64) -> i64 {
    (((num_tokens * k) as f64 / num_experts as f64 * capacity_factor).floor() as i64).max(1)
}

impl Routing {
    /// A token-choice routing: token `n` sends `indices[n, j]` the weight
    /// `weights[n, j]` (both `[N, k]`); `logits` and `probs` are `[N, E]`.
    pub fn token_choice(indices: Tensor, weights: Tensor, logits: Tensor, probs: Tensor) -> Self {
        let (n, k) = (indices.size()[0], indices.size()[1]);
        let token = Tensor::arange(n, (Kind::Int64, indices.device()))
            .unsqueeze(1)
            .expand([n, k], false)
            .reshape([-1]);
        Routing {
            token,
            expert: indices.reshape([-1]),
            weight: weights.reshape([-1]),
            top_k: Some(k),
            num_experts: logits.size()[1],
            logits,
            probs,
            dropped: None,
            capacity: None,
        }
    }

    /// An expert-choice routing from its slots (`token`, `expert`,
    /// `weight`, each `[S]`), which each expert's `capacity` bounds;
    /// `logits` and `probs` are `[N, E]`.
    pub fn expert_choice(
        token: Tensor,
        expert: Tensor,
        weight: Tensor,
        logits: Tensor,
        probs: Tensor,
        capacity: i64,
    ) -> Self {
        Routing {
            token,
            expert,
            weight,
            top_k: None,
            num_experts: logits.size()[1],
            logits,
            probs,
            dropped: None,
            capacity: Some(capacity),
        }
    }

    /// The chosen experts of a token-choice routing, `[N, k]` int64, each
    /// row `k` distinct experts.
    pub fn indices(&self) -> Result<Tensor> {
        self.per_token(&self.expert, "indices")
    }

    /// The weights of a token-choice routing, `[N, k]`.
    pub fn weights(&self) -> Result<Tensor> {
        self.per_token(&self.weight, "weights")
    }

    /// The slots marked dropped, `[N, k]` bool, of a token-choice routing
    /// to which a capacity limit was applied (`None` without a limit).
    pub fn dropped_per_token(&self) -> Result<Option<Tensor>> {
        self.dropped
            .as_ref()
            .map(|d| self.per_token(d, "dropped"))
            .transpose()
    }

    /// `slots` (`[S]`, slot order) as `[N, k]`.
    fn per_token(&self, slots: &Tensor, what: &str) -> Result<Tensor> {
        match self.top_k {
            Some(k) => Ok(slots.view([-1, k])),
            None => Err(MoeError::config(format!(
                "Routing::{what} is the [N, k] view of a token-choice routing, and this is \
                 an expert-choice routing (a token has any number of experts): read the \
                 slots `token`, `expert` and `weight` instead"
            ))),
        }
    }

    /// For each slot (slot order), how many earlier slots chose the same
    /// expert: its row in that expert's buffer. `[S]` int64. A capacity
    /// limit `C` keeps exactly the slots whose position is `< C`.
    pub fn slot_positions(&self) -> Tensor {
        (self.expert.one_hot(self.num_experts).cumsum(0, Kind::Int64) - 1)
            .gather(1, &self.expert.unsqueeze(1), false)
            .squeeze_dim(1)
    }

    /// Number of tokens `N`.
    pub fn num_tokens(&self) -> i64 {
        self.probs.size()[0]
    }

    /// Number of slots `S` (`N k` under token choice).
    pub fn num_slots(&self) -> i64 {
        self.expert.size()[0]
    }

    /// The sparse gate matrix `G`, `[N, E]`: `G[n, e]` is the weight of expert
    /// `e` for token `n`, zero where `e` was not chosen (makeMoE's `gating_output`).
    pub fn dense_gates(&self) -> Tensor {
        let (n, e) = (self.num_tokens(), self.num_experts);
        Tensor::zeros([n * e], (self.weight.kind(), self.weight.device()))
            .scatter(0, &self.dense_index(), &self.weight)
            .view([n, e])
    }

    /// Which experts each token was sent to, `[N, E]` bool (dropped slots
    /// included, as in [`Routing::expert_counts`]).
    pub fn chosen(&self) -> Tensor {
        let (n, e) = (self.num_tokens(), self.num_experts);
        Tensor::zeros([n * e], (Kind::Bool, self.expert.device()))
            .index_fill(0, &self.dense_index(), 1)
            .view([n, e])
    }

    /// `token * E + expert` of each slot: its entry in a flat `[N E]` matrix.
    fn dense_index(&self) -> Tensor {
        &self.token * self.num_experts + &self.expert
    }

    /// Slots routed to each expert, `[E]` (int64); sums to `S`. Dropped
    /// slots count: this is the router's choice, the load it asked for.
    pub fn expert_counts(&self) -> Tensor {
        self.count_slots(None)
    }

    /// Slots each expert actually processes, `[E]`: [`Routing::expert_counts`]
    /// less the slots dropped by a capacity limit.
    pub fn kept_counts(&self) -> Tensor {
        let kept = self.dropped.as_ref().map(Tensor::logical_not);
        self.count_slots(kept.as_ref())
    }

    /// Per expert, the number of slots (those where `mask` is true, if
    /// given). A scatter-add rather than `bincount`, which on CUDA reads the
    /// largest index back to the host to size its output.
    fn count_slots(&self, mask: Option<&Tensor>) -> Tensor {
        let ones = match mask {
            Some(mask) => mask.to_kind(Kind::Int64),
            None => self.expert.ones_like().to_kind(Kind::Int64),
        };
        Tensor::zeros([self.num_experts], (Kind::Int64, self.expert.device())).scatter_add(
            0,
            &self.expert.to_kind(Kind::Int64),
            &ones,
        )
    }

    /// One routing over the tokens of `parts` in order (e.g. the
    /// micro-batches of a step): the slots of part `i` with their tokens
    /// shifted past those of the parts before it. The parts must route over
    /// the same experts; the result is token choice when every part is with
    /// the same `k`, and keeps `dropped` and the capacity (summed: each
    /// part's slots of an expert are bounded by its own) when every part
    /// has them.
    pub fn concat(parts: &[&Routing]) -> Result<Routing> {
        let first = parts
            .first()
            .ok_or_else(|| MoeError::config("Routing::concat needs at least one routing"))?;
        let e = first.num_experts;
        if let Some(r) = parts.iter().find(|r| r.num_experts != e) {
            return Err(MoeError::config(format!(
                "Routing::concat over routings with different expert counts ({e} and {})",
                r.num_experts
            )));
        }
        let cat = |f: &dyn Fn(&Routing) -> Tensor| {
            Tensor::cat(&parts.iter().map(|r| f(r)).collect::<Vec<_>>(), 0)
        };
        let mut offset = 0;
        let mut tokens = Vec::with_capacity(parts.len());
        for r in parts {
            tokens.push(&r.token + offset);
            offset += r.num_tokens();
        }
        let dropped = parts
            .iter()
            .map(|r| r.dropped.as_ref())
            .collect::<Option<Vec<_>>>()
            .map(|d| Tensor::cat(&d, 0));
        let top_k = first
            .top_k
            .filter(|k| parts.iter().all(|r| r.top_k == Some(*k)));
        Ok(Routing {
            token: Tensor::cat(&tokens, 0),
            expert: cat(&|r| r.expert.shallow_clone()),
            weight: cat(&|r| r.weight.shallow_clone()),
            top_k,
            logits: cat(&|r| r.logits.shallow_clone()),
            probs: cat(&|r| r.probs.shallow_clone()),
            dropped,
            capacity: parts.iter().map(|r| r.capacity).sum::<Option<i64>>(),
            num_experts: e,
        })
    }
}
