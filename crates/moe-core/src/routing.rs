use tch::{Kind, Tensor};

/// A router's decision for a flat batch of `N` tokens over `E` experts.
///
/// Routers produce it; dispatchers consume `indices` and `weights`; balance
/// losses and routing statistics read `logits` and `probs`.
#[derive(Debug)]
pub struct Routing {
    /// Chosen experts, `[N, k]`, int64, each row `k` distinct experts.
    pub indices: Tensor,
    /// Weight of each chosen expert, `[N, k]`; rows sum to 1 for softmax routers.
    pub weights: Tensor,
    /// Router logits over all experts, `[N, E]` (after noise, if any was added).
    pub logits: Tensor,
    /// Number of experts `E`.
    pub num_experts: i64,
}

impl Routing {
    /// Number of experts chosen per token.
    pub fn top_k(&self) -> i64 {
        self.indices.size()[1]
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

    /// Tokens routed to each expert, `[E]` (int64); sums to `N * k`.
    pub fn expert_counts(&self) -> Tensor {
        self.indices
            .flatten(0, -1)
            .bincount::<Tensor>(None, self.num_experts)
            .to_kind(Kind::Int64)
    }
}
