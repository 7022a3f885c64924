use tch::{Kind, Tensor};

/// A router's decision for a flat batch of `N` tokens over `E` experts.
///
/// Routers produce it; dispatchers consume `indices` and `weights` (and
/// `num_experts`); balance losses and routing statistics read `logits`,
/// `probs` and `dropped`.
#[derive(Debug)]
pub struct Routing {
    /// Chosen experts, `[N, k]`, int64, each row `k` distinct experts.
    pub indices: Tensor,
    /// Weight of each chosen expert, `[N, k]`; rows sum to 1 for gates that
    /// renormalise over the chosen experts (times the router's routed scaling
    /// factor). A slot dropped by an expert-capacity limit has weight 0.
    pub weights: Tensor,
    /// Router scores over all experts, `[N, E]`, before selection (after
    /// noise, if any was added); the router z-loss reads them.
    pub logits: Tensor,
    /// Router probabilities over all experts, `[N, E]`, rows summing to 1
    /// (`softmax(logits)` for softmax gates, the normalised affinities for a
    /// sigmoid gate): the `P_i` of the balance losses.
    pub probs: Tensor,
    /// Slots removed by an expert-capacity limit, `[N, k]` bool, or `None`
    /// when no limit was applied.
    pub dropped: Option<Tensor>,
    /// The expert capacity `C` that produced `dropped` ([`expert_capacity`]):
    /// each expert keeps at most `C` slots of this batch. `None` when no
    /// limit was applied. The capacity dispatch strategy sizes its per-expert
    /// buffers with it.
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
    /// For each slot `s = n k + j` (token order), how many earlier slots chose
    /// the same expert: its row in that expert's buffer. `[N k]` int64. A
    /// capacity limit `C` keeps exactly the slots whose position is `< C`.
    pub fn slot_positions(&self) -> Tensor {
        let expert = self.indices.flatten(0, -1);
        (expert.one_hot(self.num_experts).cumsum(0, Kind::Int64) - 1)
            .gather(1, &expert.unsqueeze(1), false)
            .squeeze_dim(1)
    }

    /// Number of experts chosen per token.
    pub fn top_k(&self) -> i64 {
        self.indices.size()[1]
    }

    /// Number of tokens `N`.
    pub fn num_tokens(&self) -> i64 {
        self.indices.size()[0]
    }

    /// The sparse gate matrix `G`, `[N, E]`: `G[n, e]` is the weight of expert
    /// `e` for token `n`, zero where `e` was not chosen (makeMoE's `gating_output`).
    pub fn dense_gates(&self) -> Tensor {
        let n = self.indices.size()[0];
        Tensor::zeros(
            [n, self.num_experts],
            (self.weights.kind(), self.weights.device()),
        )
        .scatter(1, &self.indices, &self.weights)
    }

    /// Slots routed to each expert, `[E]` (int64); sums to `N * k`. Dropped
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
        let expert = self.indices.flatten(0, -1);
        let ones = match mask {
            Some(mask) => mask.flatten(0, -1).to_kind(Kind::Int64),
            None => expert.ones_like().to_kind(Kind::Int64),
        };
        Tensor::zeros([self.num_experts], (Kind::Int64, expert.device())).scatter_add(
            0,
            &expert.to_kind(Kind::Int64),
            &ones,
        )
    }
}
