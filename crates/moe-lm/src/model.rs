use crate::{Batch, Block, ModelConfig};
use moe_attention::KvCache;
use moe_core::{check_rank, check_same_device, MoeError, Result, Routing};
use moe_routers::RoutingStats;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// makeMoE's `SparseMoELanguageModel`: token and position embeddings,
/// `n_layer` attention + sparse-MoE blocks, a final LayerNorm and a linear
/// head to next-token logits,
///
/// `logits = W_lm LN_f(Blocks(E_tok[idx] + E_pos[0..T])) + b_lm`.
#[derive(Debug)]
pub struct MoeLanguageModel {
    tok_emb: nn::Embedding,
    pos_emb: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    lm_head: nn::Linear,
    config: ModelConfig,
}

/// Logits and the routing of every MoE layer.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[B, T, vocab_size]`.
    pub logits: Tensor,
    /// One per block, over its `B * T` tokens.
    pub routings: Vec<Routing>,
    /// Sum over blocks of their weighted balance losses; `None` when the
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
    /// One per block: the aux-free bias update and routing statistics read them.
    pub routings: Vec<Routing>,
}

impl MoeLanguageModel {
    /// Creates the model's parameters under `p`. Embeddings are N(0, 1) and
    /// LayerNorms (1, 0), as in PyTorch; linear weights follow `config.init`.
    pub fn new(p: &nn::Path, config: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let (v, c) = (config.vocab_size, config.n_embd);
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
            ..Default::default()
        };
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(&(p / "blocks" / i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(MoeLanguageModel {
            tok_emb: nn::embedding(p / "tok_emb", v, c, emb),
            pos_emb: nn::embedding(p / "pos_emb", config.block_size, c, emb),
            blocks,
            ln_f: nn::layer_norm(p / "ln_f", vec![c], Default::default()),
            lm_head: moe_core::linear(p / "lm_head", c, v, true, config.init),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the parameters live.
    pub fn device(&self) -> Device {
        self.lm_head.ws.device()
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// `idx: [B, T]` int64 token ids, `T <= block_size`, ids in the vocabulary.
    pub fn forward_t(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput> {
        self.check_tokens(idx, "token ids")?;
        self.forward_trusted(idx, train)
    }

    /// Incremental decoding: the logits of the `T_new` positions `idx`
    /// (`[B, T_new]`) that follow the positions held in `cache`, whose keys
    /// and values are appended to it. Equals the last `T_new` positions of
    /// [`Self::forward_t`] on the whole sequence, in evaluation mode, while
    /// the whole sequence fits in `block_size`.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut ModelCache) -> Result<ForwardOutput> {
        self.check_tokens(idx, "token ids")?;
        if cache.layers.len() != self.blocks.len() {
            *cache = ModelCache::new(self.blocks.len());
        }
        let (past, t) = (cache.len(), idx.size()[1]);
        if past + t > self.config.block_size {
            return Err(MoeError::SequenceTooLong {
                len: past + t,
                block_size: self.config.block_size,
            });
        }
        let pos = Tensor::arange_start(past, past + t, (Kind::Int64, idx.device()));
        let mut x = self.tok_emb.forward(idx) + self.pos_emb.forward(&pos);
        let mut routings = Vec::with_capacity(self.blocks.len());
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let out = block.forward_cached(&x, layer_cache)?;
            x = out.output;
            routings.push(out.routing);
        }
        let logits = self.lm_head.forward(&self.ln_f.forward(&x));
        // Decoding trains nothing: no balance loss.
        Ok(ForwardOutput {
            logits,
            routings,
            aux_loss: None,
        })
    }

    /// Mean next-token cross-entropy of `idx` against `targets` (both `[B, T]`).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        self.check_tokens(idx, "token ids")?;
        self.check_tokens(targets, "targets")?;
        if idx.size() != targets.size() {
            return Err(MoeError::Shape {
                what: "targets".into(),
                expected: format!("the shape of the token ids, {:?}", idx.size()),
                got: targets.size(),
            });
        }
        let out = self.forward_trusted(idx, train)?;
        Ok(cross_entropy(&out.logits, targets))
    }

    /// The training loss of a batch drawn from a [`crate::Dataset`], whose
    /// tokens were validated when the dataset was built (no per-step host
    /// synchronisation): cross-entropy plus the configured balance losses.
    pub fn batch_loss(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        Ok(self.batch_objective(batch, train)?.total)
    }

    /// [`MoeLanguageModel::batch_loss`] with its parts and the routings.
    pub fn batch_objective(&self, batch: &Batch, train: bool) -> Result<BatchLoss> {
        let out = self.forward_trusted(&batch.x, train)?;
        let cross_entropy = cross_entropy(&out.logits, &batch.y);
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

    /// The hook the training loop calls after each optimizer step, with the
    /// routings of that step: walks the MoE layers so that routers with
    /// non-learned state (DeepSeek-V3's balancing bias) update it.
    pub fn after_optimizer_step(&self, routings: &[Routing]) -> Result<()> {
        if routings.len() != self.blocks.len() {
            return Err(MoeError::config(format!(
                "after_optimizer_step needs one routing per block ({}), got {}",
                self.blocks.len(),
                routings.len()
            )));
        }
        for (block, routing) in self.blocks.iter().zip(routings) {
            block.moe().after_step(routing)?;
        }
        Ok(())
    }

    /// Routing statistics of each MoE layer on a batch, in evaluation mode.
    pub fn routing_stats(&self, batch: &Batch) -> Result<Vec<RoutingStats>> {
        let out = tch::no_grad(|| self.forward_trusted(&batch.x, false))?;
        out.routings.iter().map(RoutingStats::of).collect()
    }

    fn forward_trusted(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput> {
        let t = idx.size()[1];
        if t > self.config.block_size {
            return Err(MoeError::SequenceTooLong {
                len: t,
                block_size: self.config.block_size,
            });
        }
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        let mut x = self.tok_emb.forward(idx) + self.pos_emb.forward(&pos);
        let mut routings = Vec::with_capacity(self.blocks.len());
        let mut aux_loss: Option<Tensor> = None;
        for block in &self.blocks {
            let out = block.forward_t(&x, train)?;
            x = out.output;
            routings.push(out.routing);
            aux_loss = match (aux_loss, out.aux_loss) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        let logits = self.lm_head.forward(&self.ln_f.forward(&x));
        Ok(ForwardOutput {
            logits,
            routings,
            aux_loss,
        })
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
        check_same_device(idx, what, self.lm_head.ws.device())?;
        let t = idx.size()[1];
        if t > self.config.block_size {
            return Err(MoeError::SequenceTooLong {
                len: t,
                block_size: self.config.block_size,
            });
        }
        if idx.numel() > 0 {
            let vocab_size = self.config.vocab_size;
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

/// One [`KvCache`] per block: what [`MoeLanguageModel::forward_cached`]
/// remembers between calls.
#[derive(Debug, Default)]
pub struct ModelCache {
    layers: Vec<KvCache>,
}

impl ModelCache {
    /// An empty cache for a model of `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        ModelCache {
            layers: (0..n_layer).map(|_| KvCache::new()).collect(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(KvCache::clear);
    }
}

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits
        .view([-1, v])
        .to_kind(Kind::Float)
        .cross_entropy_for_logits(&targets.view([-1]))
}
