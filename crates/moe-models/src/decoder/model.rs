use super::{DecoderConfig, DecoderLayer, LayerOutput};
use crate::{check_context, CausalLm, ForwardOutput, LmConfig, ModelCache};
use moe_core::profile::span;
use moe_core::{linear, IntoChecked, MoeError, Result, Routing};
use moe_dispatch::ExpertParallelism;
use moe_nn::{KvCache, RmsNorm};
use tch::{nn, Device, Tensor};

/// The decoder family's causal language model (Mixtral's
/// `MixtralForCausalLM` and its relatives):
///
/// `logits = W_lm RMSNorm(Layers(E[idx]))`,
///
/// with `W_lm = E` when `tie_word_embeddings`. Positions enter through the
/// rotary embeddings of every attention layer, so the model takes any
/// length up to `max_position_embeddings`. Parameters carry Hugging Face's
/// names: `model/embed_tokens`, `model/layers/N/...`, `model/norm`,
/// `lm_head` (absent when tied).
#[derive(Debug)]
pub struct DecoderModel {
    /// `[vocab_size, hidden_size]`.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<nn::Linear>,
    config: DecoderConfig,
}

impl DecoderModel {
    /// Creates the parameters under `p`: embeddings N(0, 0.02^2) (as
    /// Hugging Face's `initializer_range`), RMSNorm gains 1, linear layers
    /// by `config.init`.
    pub fn new(p: &nn::Path, config: impl IntoChecked<DecoderConfig>) -> Result<Self> {
        Self::with_parallelism(p, config, None)
    }

    /// [`DecoderModel::new`] with the experts of every MoE layer spread
    /// over the ranks of `parallelism` (each rank holds `E / P` of them,
    /// everything else whole).
    pub fn with_parallelism(
        p: &nn::Path,
        config: impl IntoChecked<DecoderConfig>,
        parallelism: Option<&ExpertParallelism>,
    ) -> Result<Self> {
        let config = config.into_checked()?;
        let (v, d) = (config.vocab_size, config.hidden_size);
        let model = p / "model";
        let embed_tokens = moe_core::var(
            &(&model / "embed_tokens"),
            "weight",
            &[v, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&(&model / "layers" / i), &config, i, parallelism))
            .collect::<Result<Vec<_>>>()?;
        let lm_head =
            (!config.tie_word_embeddings).then(|| linear(p / "lm_head", d, v, false, config.init));
        Ok(DecoderModel {
            embed_tokens,
            layers,
            norm: RmsNorm::new(&(&model / "norm"), d, config.rms_norm_eps),
            lm_head,
            config: config.into_inner(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The decoder layers, e.g. to change an MoE layer's dispatch strategy.
    pub fn layers_mut(&mut self) -> &mut [DecoderLayer] {
        &mut self.layers
    }

    /// Embeddings, then `layer_fn` over the layers, then norm and head.
    fn run(
        &self,
        idx: &Tensor,
        mut layer_fn: impl FnMut(usize, &DecoderLayer, &Tensor) -> Result<LayerOutput>,
    ) -> Result<ForwardOutput> {
        let mut x = span("embedding", || {
            Tensor::embedding(&self.embed_tokens, idx, -1, false, false)
        });
        let mut routings = Vec::new();
        let mut aux_loss: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let out = layer_fn(i, layer, &x)?;
            x = out.hidden;
            routings.extend(out.routing);
            aux_loss = match (aux_loss, out.aux_loss) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        let logits = span("lm_head", || {
            let x = self.norm.forward(&x);
            let logits = match &self.lm_head {
                Some(head) => moe_core::linear_in_input_dtype(&x, head),
                None => x.matmul(&self.embed_tokens.tr()),
            };
            // Logits leave in f32 (f64 for an f64 model) whatever the
            // compute dtype, for sampling and the loss, as transformers'
            // `generate` takes them.
            logits.to_kind(moe_core::accumulation_kind(logits.kind()))
        });
        Ok(ForwardOutput {
            logits,
            routings,
            aux_loss,
        })
    }

    /// The MoE layers, in order.
    fn moe_layers(&self) -> impl Iterator<Item = &moe_block::SparseMoe> {
        self.layers
            .iter()
            .filter_map(|l| match l.feed_forward_network() {
                super::FeedForward::Moe(moe) => Some(moe.as_ref()),
                super::FeedForward::Dense(_) => None,
            })
    }
}

impl CausalLm for DecoderModel {
    fn lm_config(&self) -> LmConfig {
        LmConfig::Decoder(self.config.clone())
    }

    fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    fn num_moe_layers(&self) -> usize {
        self.config.num_moe_layers() as usize
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_context(&self) -> i64 {
        self.config.max_position_embeddings
    }

    fn forward_unchecked(&self, idx: &Tensor, train: bool) -> Result<ForwardOutput> {
        check_context(idx.size()[1], self.config.max_position_embeddings)?;
        self.run(idx, |_, layer, x| layer.forward_t(x, train))
    }

    fn forward_cached(&self, idx: &Tensor, cache: &mut ModelCache) -> Result<ForwardOutput> {
        self.check_tokens(idx, "token ids")?;
        let layers = cache.layers_mut(self.layers.len());
        let past = layers.first().map_or(0, KvCache::len);
        check_context(past + idx.size()[1], self.config.max_position_embeddings)?;
        // One position at a time (decoding), the next layer's experts are
        // read ahead while this layer computes, where they are left in the
        // checkpoint's files.
        let decoding = idx.size()[1] == 1;
        let mut out = self.run(idx, |i, layer, x| {
            if let (true, Some(next)) = (decoding, self.layers.get(i + 1)) {
                span("prefetch", || next.prefetch_experts(x))?;
            }
            layer.forward_cached(x, &mut layers[i])
        })?;
        out.aux_loss = None;
        Ok(out)
    }

    fn new_cache(&self) -> ModelCache {
        ModelCache::new(self.layers.len())
    }

    fn after_optimizer_step(&self, routings: &[Routing]) -> Result<()> {
        let expected = self.num_moe_layers();
        if routings.len() != expected {
            return Err(MoeError::config(format!(
                "after_optimizer_step needs one routing per MoE layer ({expected}), got {}",
                routings.len()
            )));
        }
        for (moe, routing) in self.moe_layers().zip(routings) {
            moe.after_step(routing)?;
        }
        Ok(())
    }

    fn is_no_decay(&self, name: &str, shape: &[i64]) -> bool {
        shape.len() < 2 || name.contains("embed_tokens")
    }

    fn expert_shards(&self) -> Vec<Tensor> {
        self.moe_layers()
            .flat_map(|moe| moe.expert_shards())
            .collect()
    }
}
