//! Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant,
//! Radford et al. 2019), trained on the corpus with Hugging Face's
//! `tokenizers`: the step "from characters to subwords".

use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// A byte-level BPE tokenizer. Every string can be encoded (its bytes are
/// in the base alphabet); it serialises as Hugging Face's `tokenizer.json`,
/// which Python's `tokenizers.Tokenizer.from_str` reads back.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BpeTokenizer {
    /// Boxed: the tokenizer is large, and `Tokenizer` enums hold it by value.
    inner: Box<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BpeTokenizer {{ vocab_size: {} }}", self.vocab_size())
    }
}

impl PartialEq for BpeTokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.inner.to_string(false).ok() == other.inner.to_string(false).ok()
    }
}

impl BpeTokenizer {
    /// Learns merges on `text` until the vocabulary holds `vocab_size`
    /// tokens (256 byte tokens plus merges; fewer if the text runs out of pairs).
    pub fn train(text: &str, vocab_size: usize) -> Result<Self> {
        if vocab_size < 256 {
            return Err(MoeError::config(format!(
                "a byte-level BPE vocabulary needs at least 256 tokens (one per byte), got {vocab_size}"
            )));
        }
        if text.is_empty() {
            return Err(MoeError::Data("cannot train BPE on an empty corpus".into()));
        }
        let byte_level = ByteLevel::new(false, true, true);
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner
            .train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| MoeError::Data(format!("BPE training failed: {e}")))?;
        Ok(BpeTokenizer {
            inner: Box::new(inner),
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> i64 {
        self.inner.get_vocab_size(true) as i64
    }

    /// The `tokenizers` library's tokenizer.
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| MoeError::Encode(format!("{text:?} with BPE: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// The text of `ids`; an error for an id outside the vocabulary.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = vocab_ids(ids, self.vocab_size())?;
        self.inner
            .decode(&ids, false)
            .map_err(|e| MoeError::Encode(format!("BPE decoding: {e}")))
    }
}

/// `ids` as the `u32` ids of a `tokenizers` vocabulary of `vocab_size`
/// tokens; an id outside it is [`MoeError::TokenOutOfVocab`].
pub(crate) fn vocab_ids(ids: &[i64], vocab_size: i64) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|_| id < vocab_size)
                .ok_or(MoeError::TokenOutOfVocab { id, vocab_size })
        })
        .collect()
}
