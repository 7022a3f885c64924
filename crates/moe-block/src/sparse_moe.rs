use crate::SparseMoeConfig;
use moe_core::profile::span;
use moe_core::{
    check_float, check_same_device, linear, linear_in_input_dtype, Checked, IntoChecked, MoeError,
    Result, Routing,
};
use moe_dispatch::{Dispatch, ExpertParallel, ExpertParallelism};
use moe_experts::ExpertBank;
use moe_routers::{build_router, Router, RouterSpec, WeightsOn};
use tch::{nn, Device, Kind, Tensor};

/// Sparse Mixture-of-Experts feed-forward layer (Shazeer et al. 2017;
/// Mixtral, arXiv 2401.04088), with shared experts (DeepSeekMoE, arXiv
/// 2401.06066, eq. 9-11; Qwen2-MoE's sigmoid-gated shared expert, HF
/// `Qwen2MoeSparseMoeBlock`):
///
/// `y(x) = sum_{e in TopK(x)} G(x)_e * FFN_e(x) + c(x) sum_{s < K_s} FFN^shared_s(x)`,
///
/// `c(x) = sigmoid(x w_g)` with a shared-expert gate, else 1. With the
/// weights on the experts' inputs ([`moe_routers::WeightsOn::Input`], Llama
/// 4) the routed term is `sum_{e in TopK(x)} FFN_e(G(x)_e x)`.
///
/// The router picks `k` experts per token (or, with expert choice, each
/// expert picks its tokens and `TopK(x)` is the experts that chose `x`); the
/// dispatch strategy runs only those experts and sums their outputs
/// weighted by the gate; shared experts see every token.
#[derive(Debug)]
pub struct SparseMoe {
    router: Box<dyn Router>,
    experts: ExpertBank,
    shared_experts: Option<ExpertBank>,
    shared_expert_gate: Option<nn::Linear>,
    dispatch: Box<dyn Dispatch>,
    /// With expert parallelism, `experts` holds this rank's share.
    expert_parallel: Option<ExpertParallel>,
    config: SparseMoeConfig,
}

/// The layer's output, the routing that produced it (for routing statistics
/// and the aux-free bias update) and its balance loss.
#[derive(Debug)]
pub struct MoeOutput {
    /// Same shape as the input.
    pub output: Tensor,
    /// Routing of the flattened tokens, `N = x.numel() / d`.
    pub routing: Routing,
    /// The configured balance losses, weighted; `None` when none is on.
    pub aux_loss: Option<Tensor>,
}

impl SparseMoe {
    /// Parameters: `p/router/...`, `p/experts/{w_in,b_in,w_gate,w_out,b_out}`
    /// (the biases with `expert_bias`, `w_gate` with SwiGLU) and, with
    /// shared experts, `p/shared_experts/...` and, with their sigmoid gate,
    /// `p/shared_expert_gate.weight` (`[1, d]`).
    pub fn new(p: &nn::Path, config: impl IntoChecked<SparseMoeConfig>) -> Result<Self> {
        Self::build(p, config.into_checked()?, None)
    }

    /// The layer with its routed experts spread over the ranks of
    /// `parallel`'s group: `p/experts/...` holds this rank's `E / P`
    /// experts (global ids `r E / P ..`, drawn as the rows of the whole
    /// bank one process draws, [`ExpertBank::new_shard`]), every other
    /// parameter is whole on every rank. [`SparseMoe::forward_t`] is then a collective: every rank
    /// calls it, with as many tokens as the others in the capacity mode.
    pub fn new_expert_parallel(
        p: &nn::Path,
        config: impl IntoChecked<SparseMoeConfig>,
        parallel: ExpertParallel,
    ) -> Result<Self> {
        let config = config.into_checked()?;
        if parallel.num_experts() != config.num_experts {
            return Err(MoeError::config(format!(
                "the expert-parallel split is for {} experts, the layer has {}",
                parallel.num_experts(),
                config.num_experts
            )));
        }
        Self::build(p, config, Some(parallel))
    }

    /// [`SparseMoe::new`], or [`SparseMoe::new_expert_parallel`] with the
    /// split `parallelism` gives a layer of this many experts.
    pub fn with_parallelism(
        p: &nn::Path,
        config: impl IntoChecked<SparseMoeConfig>,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Self> {
        let config = config.into_checked()?;
        match parallelism {
            Some(parallelism) => {
                let parallel = parallelism.layer(config.num_experts)?;
                Self::new_expert_parallel(p, config, parallel)
            }
            None => Self::new(p, config),
        }
    }

    /// The layer of a checked config: its banks and router take the
    /// configs derived from it, which its check covers.
    fn build(
        p: &nn::Path,
        config: Checked<SparseMoeConfig>,
        expert_parallel: Option<ExpertParallel>,
    ) -> Result<Self> {
        // A rank draws the whole bank and keeps its experts: the ranks
        // start from the model one process draws with the same seed.
        let experts = match &expert_parallel {
            Some(parallel) => {
                parallel.first_expert()..parallel.first_expert() + parallel.local_experts()
            }
            None => 0..config.num_experts,
        };
        let bank = config.expert_config();
        let router = RouterSpec {
            config: config.router.clone(),
            dims: config.router_dims(),
        };
        let shared_experts = match config.shared_expert_config() {
            Some(c) => Some(ExpertBank::new(
                &(p / "shared_experts"),
                Checked::derived(c),
            )?),
            None => None,
        };
        let shared_expert_gate = config.shared_experts.filter(|s| s.sigmoid_gate).map(|_| {
            linear(
                p / "shared_expert_gate",
                config.n_embd,
                1,
                false,
                config.init,
            )
        });
        Ok(SparseMoe {
            router: build_router(&(p / "router"), Checked::derived(router), config.init)?,
            experts: ExpertBank::new_shard(&(p / "experts"), Checked::derived(bank), experts)?,
            shared_experts,
            shared_expert_gate,
            dispatch: config.dispatch.build(),
            expert_parallel,
            config: config.into_inner(),
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &SparseMoeConfig {
        &self.config
    }

    /// The expert parallelism, when the routed experts are spread over ranks.
    pub fn expert_parallel(&self) -> Option<&ExpertParallel> {
        self.expert_parallel.as_ref()
    }

    /// The routed experts (this rank's share with expert parallelism).
    pub fn experts(&self) -> &ExpertBank {
        &self.experts
    }

    /// The variables this process holds only a share of: with expert
    /// parallelism, the routed bank's tensors (`E / P` experts each);
    /// nothing otherwise. The layer that owns them says so, so that data
    /// parallelism reduces their gradients as shards whatever their names.
    pub fn expert_shards(&self) -> Vec<Tensor> {
        match &self.expert_parallel {
            Some(_) => self
                .experts
                .tensors()
                .into_iter()
                .map(Tensor::shallow_clone)
                .collect(),
            None => Vec::new(),
        }
    }

    /// The routed experts, e.g. to load weights split from a dense FFN.
    pub fn experts_mut(&mut self) -> &mut ExpertBank {
        &mut self.experts
    }

    /// The shared experts, if any.
    pub fn shared_experts(&self) -> Option<&ExpertBank> {
        self.shared_experts.as_ref()
    }

    /// The shared experts' sigmoid gate `w_g`, if configured.
    pub fn shared_expert_gate(&self) -> Option<&nn::Linear> {
        self.shared_expert_gate.as_ref()
    }

    /// The layer's router.
    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// Replaces the dispatch strategy; the parameters stay.
    pub fn set_dispatch(&mut self, dispatch: Box<dyn Dispatch>) {
        self.dispatch = dispatch;
    }

    /// The training loop's hook after an optimizer step (see [`Router::after_step`]).
    pub fn after_step(&self, routing: &Routing) -> Result<()> {
        match &self.expert_parallel {
            // Every rank's copy of the router changes alike.
            Some(parallel) => {
                if routing.num_experts != self.config.num_experts {
                    return Err(MoeError::config(format!(
                        "after_step got a routing over {} experts, the layer has {}",
                        routing.num_experts, self.config.num_experts
                    )));
                }
                let counts = parallel.global_counts(routing)?;
                self.router.after_step_with_counts(&counts)
            }
            None => self.router.after_step(routing),
        }
    }

    /// Reads ahead the pages of the experts the router picks for `x`
    /// (`[..., d]`, the normalised input this layer would get) when the
    /// experts are left in the checkpoint's files
    /// ([`ExpertBank::map_experts`]); nothing otherwise. The next layer's
    /// router on the current hidden state guesses most of the next token's
    /// experts (Eliseev & Mazur 2023, arXiv 2312.17238), so their reads
    /// overlap this layer's computation.
    pub fn prefetch_experts(&self, x: &Tensor) -> Result<()> {
        if self.experts.mapped_experts().is_none() {
            return Ok(());
        }
        let d = self.config.n_embd;
        let flat = x.f_reshape([-1, d])?.to_kind(self.experts.w_in.kind());
        let routing = tch::no_grad(|| self.router.route_sequences(&flat, None, false))?;
        let mut experts = Vec::<i64>::try_from(&routing.expert.flatten(0, -1))?;
        experts.sort_unstable();
        experts.dedup();
        self.experts.prefetch(&experts);
        Ok(())
    }

    /// `x`: `[..., d]` (any leading dims) -> same shape. With a rank of 3 or
    /// more, the second-to-last dimension is the sequence length `T` that
    /// the per-sequence balance loss groups by and expert choice per
    /// position reads (`[B, T, d]`: at each position, the experts choose
    /// among the `B` tokens there); `[N, d]` is one sequence. An error with
    /// `train = true` when the routed experts are quantised
    /// ([`ExpertBank::quantize`]): they are for inference only.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let d = self.config.n_embd;
        let shape = x.size();
        if shape.is_empty() || shape[shape.len() - 1] != d {
            return Err(MoeError::Shape {
                what: "MoE input".to_string(),
                expected: format!("[..., {d}]"),
                got: shape,
            });
        }
        check_float(x, "MoE input")?;
        check_same_device(x, "MoE input", self.experts.w_in.device())?;
        if let (true, Some(q)) = (train, self.experts.quantization()) {
            return Err(MoeError::config(format!(
                "the routed experts are quantised ({q}) for inference: forward_t with \
                 train = true is not supported"
            )));
        }
        if train && self.experts.mapped_experts().is_some() {
            return Err(MoeError::config(
                "the routed experts are left in the checkpoint's files for inference: \
                 forward_t with train = true is not supported (load them resident to train)",
            ));
        }
        let flat = x.reshape([-1, d]);
        let seq_len = (shape.len() >= 3).then(|| shape[shape.len() - 2]);
        // The router computes in the parameters' dtype (f32 under mixed
        // precision, see `moe_core::Precision`): its softmax and top-k decide
        // which experts run, and bf16 logits tie and round.
        let routing = span("router", || {
            self.router
                .route_sequences(&flat.to_kind(self.experts.w_in.kind()), seq_len, train)
        })?;
        // Weights on the inputs (Llama 4): each slot is a token of its own.
        let per_slot = match self.config.router.weights_on {
            WeightsOn::Output => None,
            WeightsOn::Input => Some(weighted_slots(&flat, &routing)),
        };
        let (tokens, slots) = match &per_slot {
            Some((inputs, slots)) => (inputs, slots),
            None => (&flat, &routing),
        };
        // One token on the CPU (batch-1 decoding): only its experts, with a
        // few ops each, instead of a dispatch strategy's sorting and
        // gathering (the same sum, `ExpertBank::one_token`).
        let one_token = !train && flat.size()[0] == 1 && flat.device() == Device::Cpu;
        let mut output = span("experts", || match &self.expert_parallel {
            Some(parallel) => parallel.combine(tokens, slots, &self.experts, train),
            None if one_token && tokens.size()[0] == 1 => {
                Ok(self.experts.one_token(tokens, &slots.expert, &slots.weight))
            }
            None => Ok(self.dispatch.combine(tokens, slots, &self.experts, train)),
        })?;
        // Slots back onto their tokens; under top-1 token choice slot `n`
        // is token `n`'s, already in place.
        if per_slot.is_some() && routing.top_k != Some(1) {
            output = flat.zeros_like().index_add(0, &routing.token, &output);
        }
        if let Some(shared) = &self.shared_experts {
            output += span("shared_experts", || {
                let y = if one_token {
                    // Every shared expert with weight 1.
                    let all = Tensor::arange(shared.num_experts(), (Kind::Int64, Device::Cpu));
                    shared.one_token(&flat, &all, &all.ones_like().to_kind(Kind::Float))
                } else {
                    shared
                        .forward_all(&flat, train)
                        .sum_dim_intlist(0, false, None)
                };
                match &self.shared_expert_gate {
                    // In the compute dtype, as the experts (`moe_core::Precision`).
                    Some(gate) => y * linear_in_input_dtype(&flat, gate).sigmoid(),
                    None => y,
                }
            });
        }
        let aux_loss = match &self.expert_parallel {
            // The load of each expert over every rank's tokens.
            Some(parallel) if self.config.balance.is_active() => {
                let counts = parallel.global_counts(&routing)?;
                let world = parallel.world_size();
                self.config
                    .balance
                    .loss_over_ranks(&routing, seq_len, &counts, world)?
            }
            _ => self.config.balance.loss(&routing, seq_len)?,
        };
        Ok(MoeOutput {
            output: output.view(shape.as_slice()),
            routing,
            aux_loss,
        })
    }
}

/// The slots of `routing` as tokens of their own, for weights applied to
/// the experts' inputs: slot `s`'s input `w_s x_{token[s]}` (`[S, d]`), and
/// a routing that sends slot `s` to its expert with weight 1 (0 when a
/// capacity limit dropped it). The experts' outputs for these inputs are
/// the slots' outputs, to be summed onto their tokens.
fn weighted_slots(flat: &Tensor, routing: &Routing) -> (Tensor, Routing) {
    let inputs =
        flat.index_select(0, &routing.token) * routing.weight.to_kind(flat.kind()).unsqueeze(1);
    let weight = match &routing.dropped {
        Some(dropped) => dropped.logical_not().to_kind(routing.weight.kind()),
        None => routing.weight.ones_like(),
    };
    let slots = Routing {
        token: Tensor::arange(routing.num_slots(), (Kind::Int64, flat.device())),
        expert: routing.expert.shallow_clone(),
        weight,
        top_k: Some(1),
        logits: routing.logits.index_select(0, &routing.token),
        probs: routing.probs.index_select(0, &routing.token),
        dropped: routing.dropped.as_ref().map(Tensor::shallow_clone),
        capacity: routing.capacity,
        num_experts: routing.num_experts,
    };
    (inputs, slots)
}
