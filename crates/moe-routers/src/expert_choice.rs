//! Expert choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert
//! Choice Routing", arXiv 2202.09368): the experts choose their tokens.

use crate::config::wrong_gate;
use crate::{top_k_of_affinities, Gate, Router, RouterConfig, RouterDims};
use crate::{FromRouterSpec, RouterSpec};
use moe_core::Checked;
use moe_core::{accumulation_kind, linear, MoeError, Result, Routing, WeightInit};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Which tokens each expert of an expert-choice router chooses among.
///
/// Choosing among tokens makes a token's routing depend on the other tokens
/// of its scope. In a decoder, a scope that holds later positions of the
/// same sequence lets an output depend on the future, which a language
/// model must not see: [`ExpertChoiceScope::PerPosition`] is the form for
/// causal models, [`ExpertChoiceScope::AllTokens`] the paper's, for
/// encoders and other non-causal use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExpertChoiceScope {
    /// Every expert chooses among all `N` tokens of the layer's input
    /// (every position of every sequence): the paper's form. Not causal: a
    /// token's experts, hence its output, depend on later tokens of its
    /// sequence and on the other sequences of the batch. `C = max(1,
    /// floor(N k / E * capacity_factor))`, at most `N`.
    AllTokens,
    /// Every expert chooses, at each position `t`, among the `B` tokens at
    /// position `t` of the batch's `B` sequences; `C_t = floor(B k / E *
    /// capacity_factor)`, at most `B`. Causal: position `t`'s routing reads
    /// only tokens at position `t`, whose hidden states depend on positions
    /// `<= t`, so no output depends on a later token (it does depend on the
    /// other sequences of the batch, as any expert choice does).
    ///
    /// **Small batches and generation**: when `C_t` is 0 (`B k
    /// capacity_factor < E`: decoding one sequence, `B = 1`, with or without
    /// a KV cache), there is nothing to choose among; each token then
    /// takes the top-k of the same scores `S` itself, weighted by its
    /// `S[n, e]` (not renormalised: the weights expert choice gives), a
    /// token-choice routing. An input without a sequence axis (`[N, d]`)
    /// is one sequence.
    #[default]
    PerPosition,
}

/// `C = floor(M k / E * capacity_factor)`, at most `M`: how many of `M`
/// tokens each expert chooses so that the tokens get `k capacity_factor`
/// experts on average (arXiv 2202.09368, §3.1, `k = n c / e`). Rounded down
/// so that the compute never exceeds that of the configured `k`.
pub fn expert_choice_capacity(tokens: i64, k: i64, num_experts: i64, capacity_factor: f64) -> i64 {
    (((tokens * k) as f64 / num_experts as f64 * capacity_factor).floor() as i64).min(tokens)
}

/// Expert-choice selection from router `logits` (`[N, E]`; arXiv
/// 2202.09368, §3.1, eq. 1):
///
/// `S = softmax(logits)` over the experts of each token;
/// `G, I = TopK(S^T, C)` along the tokens of each scope: expert `e` takes the
/// `C` tokens with the largest `S[:, e]`, each weighted by its `S[n, e]`.
///
/// `scope` and `seq_len` (the rows hold sequences of `seq_len` tokens,
/// sequence-major; `None`: one sequence) say which tokens an expert chooses
/// among and how many ([`ExpertChoiceScope`]); `k` is the layer's experts
/// per token, the mean number the tokens get (times `capacity_factor`).
/// The slots come in expert order (expert `e`'s tokens, scope by scope,
/// best first), and the routing's capacity is the slots per expert. With
/// [`ExpertChoiceScope::PerPosition`] and `C_t = 0`, the routing is the
/// per-token top-k of `S` that the scope documents.
pub fn expert_choice(
    logits: Tensor,
    k: i64,
    capacity_factor: f64,
    scope: ExpertChoiceScope,
    seq_len: Option<i64>,
) -> Result<Routing> {
    let (n, e) = (logits.size()[0], logits.size()[1]);
    let probs = logits
        .softmax(-1, accumulation_kind(logits.kind()))
        .to_kind(logits.kind());
    let tokens = Tensor::arange(n, (Kind::Int64, logits.device()));
    // The scopes as groups: scores `[G, M, E]` and token ids `[G, M]`.
    let (scores, token_ids) = match scope {
        ExpertChoiceScope::AllTokens => (probs.unsqueeze(0), tokens.unsqueeze(0)),
        ExpertChoiceScope::PerPosition => {
            let t = seq_len.unwrap_or(n.max(1));
            if t < 1 || n % t != 0 {
                return Err(MoeError::config(format!(
                    "expert choice per position needs the sequence length to divide the {n} \
                     routed tokens (B sequences of T tokens), got a sequence length of {t}"
                )));
            }
            let b = n / t;
            (
                probs.view([b, t, e]).transpose(0, 1),
                tokens.view([b, t]).transpose(0, 1),
            )
        }
    };
    let (g, m) = (scores.size()[0], scores.size()[1]);
    let capacity = expert_choice_capacity(m, k, e, capacity_factor);
    let capacity = match scope {
        ExpertChoiceScope::AllTokens => capacity.max(1).min(m),
        ExpertChoiceScope::PerPosition if capacity == 0 => {
            return Ok(top_k_of_affinities(
                logits,
                &probs,
                &probs,
                probs.shallow_clone(),
                k,
                false,
            ));
        }
        ExpertChoiceScope::PerPosition => capacity,
    };
    let (values, chosen) = scores.topk(capacity, 1, true, true); // [G, C, E]
    let token = token_ids
        .unsqueeze(-1)
        .expand([g, m, e], false)
        .gather(1, &chosen, false);
    // Expert-major slots: `[E, G, C]`.
    let slots = |t: &Tensor| t.permute([2, 0, 1]).reshape([-1]);
    let expert = Tensor::arange(e, (Kind::Int64, logits.device()))
        .unsqueeze(1)
        .expand([e, g * capacity], false)
        .reshape([-1]);
    Ok(Routing::expert_choice(
        slots(&token),
        expert,
        slots(&values),
        logits,
        probs,
        g * capacity,
    ))
}

/// The expert-choice router ([`Gate::ExpertChoice`], [`expert_choice`]):
/// `l = W_g x (+ b_g)`, then each expert chooses its tokens. Without a
/// sequence layout ([`Router::select`], [`Router::route`]) the input is one
/// sequence; the MoE layer passes its `[B, T, d]` layout through
/// [`Router::route_sequences`].
#[derive(Debug)]
pub struct ExpertChoiceRouter {
    gate: nn::Linear,
    capacity_factor: f64,
    scope: ExpertChoiceScope,
    dims: RouterDims,
    config: RouterConfig,
}

impl FromRouterSpec for ExpertChoiceRouter {
    /// Parameters: `p/gate` (`weight [E, d]`, `bias [E]` with `config.bias`).
    fn from_spec(p: &nn::Path, spec: &Checked<RouterSpec>, init: WeightInit) -> Result<Self> {
        let (dims, config) = (spec.dims, &spec.config);
        let Gate::ExpertChoice {
            capacity_factor,
            scope,
        } = config.gate
        else {
            return Err(wrong_gate(
                "ExpertChoiceRouter",
                "expert_choice",
                &config.gate,
            ));
        };
        let (d, e) = (dims.input_dim, dims.num_experts);
        Ok(ExpertChoiceRouter {
            gate: linear(p / "gate", d, e, config.bias, init),
            capacity_factor,
            scope,
            dims,
            config: config.clone(),
        })
    }
}

impl Router for ExpertChoiceRouter {
    fn select(&self, x: &Tensor, train: bool) -> Result<Routing> {
        self.select_sequences(x, None, train)
    }

    fn select_sequences(&self, x: &Tensor, seq_len: Option<i64>, _train: bool) -> Result<Routing> {
        self.check_input(x, self.gate.ws.device())?;
        let logits = moe_core::router_logits(x, &self.gate);
        expert_choice(
            logits,
            self.dims.top_k,
            self.capacity_factor,
            self.scope,
            seq_len,
        )
    }

    fn dims(&self) -> RouterDims {
        self.dims
    }

    fn config(&self) -> &RouterConfig {
        &self.config
    }
}
