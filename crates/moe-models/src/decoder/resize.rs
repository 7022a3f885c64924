//! A larger vocabulary for a trained decoder, after its tokenizer gained
//! pieces (Chinese-LLaMA, Cui et al. 2023, arXiv 2304.08177; Chinese-Mixtral,
//! Cui & Yao 2024, arXiv 2403.01851): the embedding and the LM head get new
//! rows, everything else is copied.

use super::{DecoderConfig, DecoderModel};
use moe_core::{MoeError, Result};
use tch::{nn, Kind, Tensor};

/// The input embeddings `[V, H]`.
const EMBED: &str = "model.embed_tokens.weight";
/// The LM head `[V, H]` (absent with tied embeddings).
const HEAD: &str = "lm_head.weight";

/// Builds the decoder of `config` (the model whose variables `source`
/// holds) with `new_vocab_size` tokens in `vs` and fills it:
///
/// - every variable is copied, except the two vocabulary matrices;
/// - `E' = [E; 1 ē^T]` and, untied, `W' = [W; 1 w̄^T]`: the old rows
///   `0..V` as they were, and each new row `V..V'` the mean of the old
///   rows, `ē = (1/V) Σ_u E[u]` (`w̄` likewise), computed in f32.
///
/// Old token ids therefore give the old hidden states, and the logits of
/// the old vocabulary (the first `V` of the `V'`) are the old logits.
///
/// Why the mean (Hewitt 2021, "Initializing New Word Embeddings for
/// Pretrained Language Models"): a new token's logit starts at the average
/// of the old logits, `w̄ · h = (1/V) Σ_u w_u · h`, so by Jensen
/// `exp(w̄ · h) <= (1/V) Σ_u exp(w_u · h)`, and the `k` new tokens together
/// take at most `k / (V + k)` of the probability mass at every position:
/// the model's distribution over the old tokens stays close to what it
/// was (KL at most `log(1 + k/V)`), where random rows can put spikes of
/// probability on tokens the model has never seen. A new token's input
/// embedding likewise starts as the model's average token instead of a
/// random direction. Continued pre-training on the new language (as
/// Chinese-LLaMA and Chinese-Mixtral did) starts from there.
///
/// The new parameters are created in `vs`'s dtype and device (f32 unless
/// the store is converted afterwards); values are copied across dtypes and
/// devices.
///
/// Errors: a `new_vocab_size` not larger than `config.vocab_size`
/// ([`MoeError::Config`]: shrinking would drop trained rows and re-number
/// nothing), a variable `source` lacks ([`MoeError::Config`]) or of
/// another shape than `config` gives ([`MoeError::Shape`]).
pub fn resize_vocab(
    source: &nn::VarStore,
    config: &DecoderConfig,
    new_vocab_size: i64,
    vs: &nn::VarStore,
) -> Result<DecoderModel> {
    let old = config.vocab_size;
    if new_vocab_size <= old {
        return Err(MoeError::config(format!(
            "the new vocabulary size must be larger than the model's {old} (new rows are \
             appended, old ids keep theirs), got {new_vocab_size}"
        )));
    }
    let new_config = DecoderConfig {
        vocab_size: new_vocab_size,
        ..config.clone()
    };
    let model = DecoderModel::new(&vs.root(), &new_config)?;
    let from = source.variables();
    let take = |name: &str| {
        from.get(name).ok_or_else(|| {
            MoeError::config(format!(
                "the model to resize has no variable `{name}` (a decoder of this config has it)"
            ))
        })
    };
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vs.variables() {
            let value = take(name)?;
            let value = if name == EMBED || name == HEAD {
                check_shape(name, value, &[old, config.hidden_size])?;
                with_mean_rows(value, new_vocab_size - old)
            } else {
                value.shallow_clone()
            };
            check_shape(name, &value, &var.size())?;
            var.shallow_clone().copy_(&value);
        }
        Ok(())
    })?;
    Ok(model)
}

/// `[V, H]` with `extra` rows appended, each the mean of the `V` rows
/// (computed in f32, returned in f32).
fn with_mean_rows(rows: &Tensor, extra: i64) -> Tensor {
    let rows = rows.to_kind(Kind::Float);
    let mean = rows.mean_dim(0, true, Kind::Float);
    Tensor::cat(&[rows, mean.expand([extra, -1], false)], 0)
}

fn check_shape(name: &str, value: &Tensor, expected: &[i64]) -> Result<()> {
    if value.size() != expected {
        return Err(MoeError::Shape {
            what: format!("variable {name} of the model to resize"),
            expected: format!("{expected:?}"),
            got: value.size(),
        });
    }
    Ok(())
}
