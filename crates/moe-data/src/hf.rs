//! A pretrained Hugging Face tokenizer (`tokenizer.json`), as a checkpoint
//! on the Hub ships it.

use crate::bpe::vocab_ids;
use crate::tokenizer::known_ids;
use moe_core::{MoeError, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;
use tokenizers::models::ModelWrapper;

/// A pretrained tokenizer read from Hugging Face's `tokenizer.json` (any
/// model the `tokenizers` library knows: byte-level BPE, SentencePiece-style
/// BPE with byte fallback, WordPiece, Unigram).
///
/// It behaves as transformers' `tokenizer(text)` and
/// `tokenizer.decode(ids, skip_special_tokens=True)`: [`HfTokenizer::encode`]
/// adds the special tokens of the tokenizer's post-processor (LLaMA's and
/// Mixtral's `<s>`), [`HfTokenizer::decode`] leaves special tokens out of the
/// text. [`HfTokenizer::encode_plain`] and [`HfTokenizer::decode_all`] do
/// neither.
///
/// Serialised as `{"hf_tokenizer": <tokenizer.json>}`, so that a checkpoint
/// reading it back knows it from a [`crate::BpeTokenizer`] (whose serialised
/// form is the bare `tokenizer.json`, without these special-token rules).
#[derive(Clone)]
pub struct HfTokenizer {
    /// Boxed: the tokenizer is large, and `Tokenizer` enums hold it by value.
    inner: Box<tokenizers::Tokenizer>,
    /// One more than the largest id of the vocabulary and added tokens.
    vocab_size: i64,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HfTokenizer {{ vocab_size: {} }}", self.vocab_size)
    }
}

impl PartialEq for HfTokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.inner.to_string(false).ok() == other.inner.to_string(false).ok()
    }
}

impl HfTokenizer {
    /// Wraps a tokenizer of the `tokenizers` library.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .map(|&id| i64::from(id) + 1)
            .max()
            .unwrap_or(0);
        HfTokenizer {
            inner: Box::new(inner),
            vocab_size,
        }
    }

    /// Reads `tokenizer.json`; a missing or malformed file is a
    /// [`MoeError::Checkpoint`] naming it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot read the tokenizer (Hugging Face tokenizer.json): {e}"),
        })?;
        Ok(Self::new(inner))
    }

    /// The tokenizer of the `tokenizers` library.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        self.inner
            .to_string(pretty)
            .map_err(|e| MoeError::Data(format!("cannot serialise the tokenizer: {e}")))
    }

    /// One more than the largest token id (vocabulary and added tokens),
    /// so that every id the tokenizer produces is below it.
    pub fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    /// The id of a token (e.g. `"</s>"`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The id of the model's unknown token (`<unk>` of a SentencePiece-style
    /// BPE, `[UNK]` of WordPiece, a Unigram model's `unk_id`), if it has one.
    pub fn unk_token_id(&self) -> Option<i64> {
        let unk = match self.inner.get_model() {
            ModelWrapper::BPE(bpe) => bpe.get_unk_token().clone(),
            ModelWrapper::WordPiece(wp) => Some(wp.unk_token.clone()),
            ModelWrapper::WordLevel(wl) => Some(wl.unk_token.clone()),
            // `tokenizers` keeps it private; its serialised form has it.
            ModelWrapper::Unigram(u) => {
                return serde_json::to_value(u).ok()?.get("unk_id")?.as_i64()
            }
        }?;
        self.token_to_id(&unk)
    }

    /// Token ids of `text` with the special tokens the tokenizer adds
    /// (transformers' `tokenizer(text)["input_ids"]`).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` without added special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| {
            MoeError::Encode(format!("{text:?} with the Hugging Face tokenizer: {e}"))
        })?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The text of `ids` without special tokens (transformers'
    /// `decode(ids, skip_special_tokens=True)`). An id at or past
    /// [`HfTokenizer::vocab_size`] decodes as nothing, with one warning on
    /// stderr for the call, as in transformers: checkpoints pad their
    /// embedding past the tokenizer (OLMoE: 50304 rows for 50280 tokens).
    /// A negative id is [`MoeError::TokenOutOfVocab`].
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// The text of `ids`, special tokens included (ids past the vocabulary
    /// as in [`HfTokenizer::decode`]).
    pub fn decode_all(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, false)
    }

    fn decode_with(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids = vocab_ids(&known_ids(ids, self.vocab_size)?, self.vocab_size)?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| MoeError::Encode(format!("decoding with the Hugging Face tokenizer: {e}")))
    }
}

/// The serialised form: `{"hf_tokenizer": <tokenizer.json>}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tagged<T> {
    hf_tokenizer: T,
}

impl Serialize for HfTokenizer {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        Tagged {
            hf_tokenizer: self.inner.as_ref(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for HfTokenizer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let tagged = Tagged::<tokenizers::Tokenizer>::deserialize(deserializer)?;
        Ok(HfTokenizer::new(tagged.hf_tokenizer))
    }
}
