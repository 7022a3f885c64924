//! What every model family offers the training loop, evaluation and
//! generation: next-token logits with the routing of each MoE layer.

use crate::LmConfig;
use moe_core::{check_rank, check_same_device, MoeError, Result, Routing};
use moe_nn::KvCache;
use moe_routers::RoutingStats;
use tch::{Device, Kind, Tensor};

/// Logits and the routing of every MoE layer.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[B, T, vocab_size]`.
    pub logits: Tensor,
    /// One per MoE layer (dense layers have none), over its `B * T` tokens.
    pub routings: Vec<Routing>,
    /// Sum over layers of their weighted balance losses; `None` when the
    /// config turns none on.
    pub aux_loss: Option<Tensor>,
}

/// The training objective of a batch and its parts.
#[derive(Debug)]
pub struct BatchLoss {
    /// `cross_entropy + aux`: what the optimizer minimises.
    pub total: Tensor,
    /// Mean next-token cross-entropy.
    pub cross_entropy: Tensor,
    /// The balance losses of every layer, weighted and summed.
    pub aux: Option<Tensor>,
    /// One per MoE layer: the aux-free bias update and routing statistics read them.
    pub routings: Vec<Routing>,
}

/// A causal language model whose feed-forward layers are (some of them)
/// sparse MoE layers. [`crate::MakeMoeModel`] and [`crate::DecoderModel`]
/// implement it; the trainer, evaluation, checkpoints and [`crate::generate`]
/// take any implementor.
///
/// Implementors provide the unchecked forward pass; the checked entry points
/// ([`CausalLm::forward_t`], [`CausalLm::loss`]) validate token tensors first.
pub trait CausalLm: std::fmt::Debug {
    /// The config the model was built from (a family variant): what a
    /// checkpoint stores to rebuild it.
    fn lm_config(&self) -> LmConfig;

    /// Where the parameters live.
    fn device(&self) -> Device;

    /// Number of MoE layers, the length of [`ForwardOutput::routings`].
    fn num_moe_layers(&self) -> usize;

    /// `idx: [B, T]` int64 ids already known to be in the vocabulary, `T`
    /// within the context: logits, routings and balance losses.
    fn forward_unchecked(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput>;

    /// Incremental decoding in evaluation mode: the logits of the `T_new`
    /// positions `idx` (`[B, T_new]`) that follow the positions held in
    /// `cache`, which they are appended to. Equals the last `T_new`
    /// positions of [`CausalLm::forward_t`] on the whole sequence.
    fn forward_cached(&self, idx: &Tensor, cache: &mut ModelCache) -> Result<ForwardOutput>;

    /// An empty cache for [`CausalLm::forward_cached`].
    fn new_cache(&self) -> ModelCache;

    /// The hook the training loop calls after each optimizer step with the
    /// routings of that step, so that routers with non-learned state
    /// (DeepSeek-V3's balancing bias) update it.
    fn after_optimizer_step(&self, routings: &[Routing]) -> Result<()>;

    /// The variables this process holds only a share of (the expert banks
    /// of expert-parallel MoE layers, [`moe_block::SparseMoe::expert_shards`]);
    /// none by default.
    fn expert_shards(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Whether the trainable variable `name` is exempt from weight decay
    /// when the training config asks for decay on weight matrices only
    /// (nanoGPT's groups): biases, norms and embeddings.
    fn is_no_decay(&self, name: &str, shape: &[i64]) -> bool {
        shape.len() < 2 || name.contains("emb")
    }

    /// Vocabulary size `V`.
    fn vocab_size(&self) -> i64 {
        self.lm_config().vocab_size()
    }

    /// The longest sequence the model takes.
    fn max_context(&self) -> i64 {
        self.lm_config().max_context()
    }

    /// [`CausalLm::forward_unchecked`] after [`CausalLm::check_tokens`].
    fn forward_t(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput> {
        self.check_tokens(idx, "token ids")?;
        self.forward_unchecked(idx, train)
    }

    /// Mean next-token cross-entropy of `idx` against `targets` (both `[B, T]`).
    fn loss(&self, idx: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        self.check_tokens(idx, "token ids")?;
        self.check_tokens(targets, "targets")?;
        if idx.size() != targets.size() {
            return Err(MoeError::Shape {
                what: "targets".into(),
                expected: format!("the shape of the token ids, {:?}", idx.size()),
                got: targets.size(),
            });
        }
        let out = self.forward_unchecked(idx, train)?;
        Ok(cross_entropy(&out.logits, targets))
    }

    /// The training objective of inputs `x` and targets `y` (`[B, T]`) whose
    /// tokens were validated beforehand (a dataset checks its tokens once,
    /// so a step never synchronises with the host): cross-entropy plus the
    /// configured balance losses.
    fn batch_objective(&self, x: &Tensor, y: &Tensor, train: bool) -> Result<BatchLoss> {
        let out = self.forward_unchecked(x, train)?;
        let cross_entropy = cross_entropy(&out.logits, y);
        let total = match &out.aux_loss {
            Some(aux) => &cross_entropy + aux,
            None => cross_entropy.shallow_clone(),
        };
        Ok(BatchLoss {
            total,
            cross_entropy,
            aux: out.aux_loss,
            routings: out.routings,
        })
    }

    /// Routing statistics of each MoE layer on `x`, in evaluation mode.
    fn routing_stats(&self, x: &Tensor) -> Result<Vec<RoutingStats>> {
        let out = tch::no_grad(|| self.forward_unchecked(x, false))?;
        out.routings.iter().map(RoutingStats::of).collect()
    }

    /// Rank, dtype, device, length and range checks of a token tensor.
    /// The range check reads two numbers back from the device.
    fn check_tokens(&self, idx: &Tensor, what: &str) -> Result<()> {
        check_rank(idx, &format!("{what} [B, T]"), 2, None)?;
        if idx.kind() != Kind::Int64 {
            return Err(MoeError::Kind {
                what: what.into(),
                expected: "int64 token ids".into(),
                got: idx.kind(),
            });
        }
        check_same_device(idx, what, self.device())?;
        check_context(idx.size()[1], self.max_context())?;
        if idx.numel() > 0 {
            let vocab_size = self.vocab_size();
            let (lo, hi) = (idx.min().int64_value(&[]), idx.max().int64_value(&[]));
            if lo < 0 {
                return Err(MoeError::TokenOutOfVocab { id: lo, vocab_size });
            }
            if hi >= vocab_size {
                return Err(MoeError::TokenOutOfVocab { id: hi, vocab_size });
            }
        }
        Ok(())
    }
}

/// `len <= max_context`, else [`MoeError::SequenceTooLong`].
pub fn check_context(len: i64, max_context: i64) -> Result<()> {
    if len > max_context {
        return Err(MoeError::SequenceTooLong {
            len,
            block_size: max_context,
        });
    }
    Ok(())
}

/// One [`KvCache`] per attention layer: what
/// [`CausalLm::forward_cached`] remembers between calls.
#[derive(Debug, Default)]
pub struct ModelCache {
    layers: Vec<KvCache>,
}

impl ModelCache {
    /// An empty cache for a model of `n_layer` attention layers.
    pub fn new(n_layer: usize) -> Self {
        ModelCache {
            layers: (0..n_layer).map(|_| KvCache::new()).collect(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(KvCache::clear);
    }

    /// Marks left padding in every layer's cache ([`KvCache::set_padding`]):
    /// `real` `[B, T]` is true (non-zero) at the real tokens of the first
    /// `T` positions to be fed. Errors unless the cache is empty and `real`
    /// is `[B, T]`; a model whose attention cannot take padding (makeMoE's
    /// absolute positions, Yuan's localized filtering) errors on the next
    /// [`CausalLm::forward_cached`].
    pub fn set_padding(&mut self, real: &Tensor) -> Result<()> {
        if !self.is_empty() {
            return Err(MoeError::config(format!(
                "padding must be set before the first positions are fed, this cache holds {}",
                self.len()
            )));
        }
        self.layers
            .iter_mut()
            .try_for_each(|cache| cache.set_padding(real))
    }

    /// The per-layer caches, resized to `n_layer` (emptied) if they do not match.
    pub fn layers_mut(&mut self, n_layer: usize) -> &mut [KvCache] {
        if self.layers.len() != n_layer {
            *self = ModelCache::new(n_layer);
        }
        &mut self.layers
    }
}

/// Mean cross-entropy of `logits: [B, T, V]` against `targets: [B, T]`, in
/// f32 (f64 for f64 logits, [`moe_core::accumulation_kind`]).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    // (tch's cross_entropy_for_logits would compute in f32 whatever the input.)
    logits
        .view([-1, v])
        .log_softmax(-1, moe_core::accumulation_kind(logits.kind()))
        .nll_loss(&targets.view([-1]))
}
