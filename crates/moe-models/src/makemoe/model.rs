use super::{Block, MakeMoeConfig};
use crate::{check_context, CausalLm, ForwardOutput, LmConfig, ModelCache};
use moe_block::MoeOutput;
use moe_core::{IntoChecked, MoeError, Result, Routing};
use moe_dispatch::ExpertParallelism;
use moe_nn::KvCache;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// makeMoE's `SparseMoELanguageModel`: token and position embeddings,
/// `n_layer` attention + sparse-MoE blocks, a final LayerNorm and a linear
/// head to next-token logits,
///
/// `logits = W_lm LN_f(Blocks(E_tok[idx] + E_pos[0..T])) + b_lm`.
#[derive(Debug)]
pub struct MakeMoeModel {
    tok_emb: nn::Embedding,
    pos_emb: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    lm_head: nn::Linear,
    config: MakeMoeConfig,
}

impl MakeMoeModel {
    /// Creates the model's parameters under `p`. Embeddings are N(0, 1) and
    /// LayerNorms (1, 0), as in PyTorch; linear weights follow `config.init`.
    pub fn new(p: &nn::Path, config: impl IntoChecked<MakeMoeConfig>) -> Result<Self> {
        Self::with_parallelism(p, config, None)
    }

    /// [`MakeMoeModel::new`] with every MoE layer's experts spread over
    /// the ranks of `parallelism`.
    pub fn with_parallelism(
        p: &nn::Path,
        config: impl IntoChecked<MakeMoeConfig>,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Self> {
        let config = config.into_checked()?;
        let (v, c) = (config.vocab_size, config.n_embd);
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
            ..Default::default()
        };
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(&(p / "blocks" / i), &config, parallelism))
            .collect::<Result<Vec<_>>>()?;
        Ok(MakeMoeModel {
            tok_emb: nn::embedding(p / "tok_emb", v, c, emb),
            pos_emb: nn::embedding(p / "pos_emb", config.block_size, c, emb),
            blocks,
            ln_f: nn::layer_norm(p / "ln_f", vec![c], Default::default()),
            lm_head: moe_core::linear(p / "lm_head", c, v, true, config.init),
            config: config.into_inner(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &MakeMoeConfig {
        &self.config
    }

    /// The transformer blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The transformer blocks, e.g. to change a layer's dispatch strategy.
    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// `E_tok[idx] + E_pos[past..past + T]` through the blocks, then the head.
    fn run(
        &self,
        idx: &Tensor,
        past: i64,
        mut block_fn: impl FnMut(usize, &Block, &Tensor) -> Result<MoeOutput>,
    ) -> Result<ForwardOutput> {
        let t = idx.size()[1];
        check_context(past + t, self.config.block_size)?;
        let pos = Tensor::arange_start(past, past + t, (Kind::Int64, idx.device()));
        let mut x = self.tok_emb.forward(idx) + self.pos_emb.forward(&pos);
        let mut routings = Vec::with_capacity(self.blocks.len());
        let mut aux_loss: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let out = block_fn(i, block, &x)?;
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
}

impl CausalLm for MakeMoeModel {
    fn lm_config(&self) -> LmConfig {
        LmConfig::MakeMoe(self.config.clone())
    }

    fn device(&self) -> Device {
        self.lm_head.ws.device()
    }

    fn num_moe_layers(&self) -> usize {
        self.blocks.len()
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_context(&self) -> i64 {
        self.config.block_size
    }

    fn forward_unchecked(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput> {
        self.run(idx, 0, |_, block, x| block.forward_t(x, train))
    }

    fn forward_cached(&self, idx: &Tensor, cache: &mut ModelCache) -> Result<ForwardOutput> {
        self.check_tokens(idx, "token ids")?;
        let layers = cache.layers_mut(self.blocks.len());
        let past = layers.first().map_or(0, KvCache::len);
        let mut out = self.run(idx, past, |i, block, x| {
            block.forward_cached(x, &mut layers[i])
        })?;
        // Decoding trains nothing: no balance loss.
        out.aux_loss = None;
        Ok(out)
    }

    fn new_cache(&self) -> ModelCache {
        ModelCache::new(self.blocks.len())
    }

    fn after_optimizer_step(&self, routings: &[Routing]) -> Result<()> {
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

    fn expert_shards(&self) -> Vec<Tensor> {
        self.blocks
            .iter()
            .flat_map(|block| block.moe().expert_shards())
            .collect()
    }
}
