use crate::bpe::vocab_ids;
use crate::{BpeTokenizer, HfTokenizer};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
use std::str::FromStr;

/// The kind of tokenizer a run trains (`char`: makeMoE's, `bpe`: subwords).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum TokenizerKind {
    #[default]
    /// One token per character of the corpus (makeMoE).
    Char,
    /// Byte-level BPE trained on the corpus.
    Bpe,
}

impl FromStr for TokenizerKind {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "char" => Ok(TokenizerKind::Char),
            "bpe" => Ok(TokenizerKind::Bpe),
            other => Err(MoeError::config(format!(
                "unknown tokenizer `{other}`: expected char or bpe"
            ))),
        }
    }
}

/// How to build a run's tokenizer from its corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizerConfig {
    /// Character or BPE.
    pub kind: TokenizerKind,
    /// Vocabulary size of a BPE tokenizer (ignored for `char`).
    pub vocab_size: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            kind: TokenizerKind::Char,
            vocab_size: 512,
        }
    }
}

/// A character, BPE or pretrained Hugging Face tokenizer; checkpoints store
/// it beside the weights.
///
/// Serialised untagged: a character tokenizer as `{"chars": [...]}`, a BPE
/// tokenizer as Hugging Face's `tokenizer.json`, a pretrained one as
/// `{"hf_tokenizer": <tokenizer.json>}` ([`HfTokenizer`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Tokenizer {
    /// Characters (makeMoE).
    Char(CharTokenizer),
    /// Byte-level BPE trained on the corpus.
    Bpe(BpeTokenizer),
    /// A pretrained tokenizer read from a checkpoint's `tokenizer.json`.
    Hf(HfTokenizer),
}

impl From<CharTokenizer> for Tokenizer {
    fn from(t: CharTokenizer) -> Self {
        Tokenizer::Char(t)
    }
}

impl From<BpeTokenizer> for Tokenizer {
    fn from(t: BpeTokenizer) -> Self {
        Tokenizer::Bpe(t)
    }
}

impl From<HfTokenizer> for Tokenizer {
    fn from(t: HfTokenizer) -> Self {
        Tokenizer::Hf(t)
    }
}

impl Tokenizer {
    /// Builds the tokenizer `config` asks for from `text`.
    pub fn train(text: &str, config: &TokenizerConfig) -> Result<Self> {
        match config.kind {
            TokenizerKind::Char => CharTokenizer::from_text(text).map(Tokenizer::Char),
            TokenizerKind::Bpe => BpeTokenizer::train(text, config.vocab_size).map(Tokenizer::Bpe),
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> i64 {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Bpe(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.vocab_size(),
        }
    }

    /// Token ids of `text`; text the tokenizer cannot encode is an error.
    /// A pretrained tokenizer adds its special tokens ([`HfTokenizer::encode`]).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Bpe(t) => t.encode(text),
            Tokenizer::Hf(t) => t.encode(text),
        }
    }

    /// The text of `ids`. A pretrained tokenizer leaves special tokens out
    /// ([`HfTokenizer::decode`]). An id at or past [`Tokenizer::vocab_size`]
    /// decodes as nothing, with one warning on stderr for the call, as
    /// transformers' `decode` does: checkpoints pad their embedding past the
    /// tokenizer (OLMoE: 50304 rows for 50280 tokens), so a model can emit
    /// ids no tokenizer entry has. A negative id is
    /// [`MoeError::TokenOutOfVocab`].
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let known = known_ids(ids, self.vocab_size())?;
        match self {
            Tokenizer::Char(t) => t.decode(&known),
            Tokenizer::Bpe(t) => t.decode(&known),
            Tokenizer::Hf(t) => t.decode(&known),
        }
    }
}

/// The ids of `ids` below `vocab_size`, in order; the others (ids of an
/// embedding padded past the tokenizer) are left out with one warning on
/// stderr naming them. A negative id is [`MoeError::TokenOutOfVocab`]:
/// no model emits one.
pub(crate) fn known_ids(ids: &[i64], vocab_size: i64) -> Result<Vec<i64>> {
    if let Some(&id) = ids.iter().find(|&&id| id < 0) {
        return Err(MoeError::TokenOutOfVocab { id, vocab_size });
    }
    let (known, unknown): (Vec<i64>, Vec<i64>) = ids.iter().partition(|&&id| id < vocab_size);
    if !unknown.is_empty() {
        warn_unknown(&unknown, vocab_size);
    }
    Ok(known)
}

/// The warning for ids past the tokenizer's vocabulary (the first few named).
fn warn_unknown(unknown: &[i64], vocab_size: i64) {
    const SHOWN: usize = 8;
    let mut list: Vec<String> = unknown.iter().take(SHOWN).map(i64::to_string).collect();
    if unknown.len() > SHOWN {
        list.push("...".into());
    }
    eprintln!(
        "warning: {} token id(s) [{}] at or past the tokenizer's {vocab_size} tokens decoded as \
         nothing (the model's embedding is larger than its tokenizer)",
        unknown.len(),
        list.join(", ")
    );
}

/// makeMoE's character tokenizer: the vocabulary is the sorted set of the
/// corpus' characters, a token is a character's rank in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl CharTokenizer {
    /// The vocabulary of `text`.
    pub fn from_text(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A tokenizer over exactly these characters (sorted, no duplicates).
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        if chars.is_empty() {
            return Err(MoeError::Data("the vocabulary is empty".into()));
        }
        if chars.windows(2).any(|w| w[0] >= w[1]) {
            return Err(MoeError::Data(
                "tokenizer characters must be sorted and distinct".into(),
            ));
        }
        Ok(CharTokenizer { chars })
    }

    /// Number of characters in the vocabulary.
    pub fn vocab_size(&self) -> i64 {
        self.chars.len() as i64
    }

    /// The vocabulary, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// Token ids of `text`; a character outside the vocabulary is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        text.chars()
            .map(|c| {
                self.chars.binary_search(&c).map(|i| i as i64).map_err(|_| {
                    MoeError::Encode(format!(
                        "character {c:?}: it is not in the vocabulary of {} characters",
                        self.chars.len()
                    ))
                })
            })
            .collect()
    }

    /// The text of `ids`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        ids.iter().map(|&id| self.decode_one(id)).collect()
    }

    /// The character of token `id`; an error outside the vocabulary.
    pub fn decode_one(&self, id: i64) -> Result<char> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.chars.get(i).copied())
            .ok_or(MoeError::TokenOutOfVocab {
                id,
                vocab_size: self.vocab_size(),
            })
    }
}

/// Turns tokens into text as they arrive, for streaming: [`TextStream::push`]
/// returns the text the new token adds (possibly empty).
///
/// A BPE or pretrained tokenizer goes through the `tokenizers` library's
/// incremental decoder (`DecodeStream`): it keeps a short window of recent
/// ids and returns a chunk once the window decodes to more text than before
/// and ends on a whole character (a byte-level token's bytes may complete a
/// character only with the next token; SentencePiece's leading space
/// depends on the token before), so each token costs a few tokens'
/// decoding, not the whole text's. The concatenated chunks are the text
/// [`Tokenizer::decode`] gives for all the ids. A character tokenizer
/// returns each token's character.
///
/// An id at or past the tokenizer's vocabulary (an embedding padded past
/// the tokenizer) adds no text; the first one of a stream is reported with
/// one warning on stderr, as [`Tokenizer::decode`] does once per call, and
/// [`TextStream::unknown_ids`] counts them.
pub struct TextStream<'a> {
    inner: Stream<'a>,
    vocab_size: i64,
    unknown: usize,
}

/// The text of one generated sequence as its tokens arrive: decoded in
/// context (the prompt's tokens go through the [`TextStream`] first, so
/// that SentencePiece's leading spaces and byte-level characters split
/// over tokens come out as [`Tokenizer::decode`] gives them), ended by the
/// first stop string the text contains. A decoding error ends it too and
/// is returned by [`Continuation::finish`].
#[derive(Debug)]
pub struct Continuation<'a> {
    stream: TextStream<'a>,
    stop: &'a [String],
    text: String,
    error: Option<MoeError>,
}

impl<'a> Continuation<'a> {
    /// The continuation of `prompt`, ended by any of `stop`.
    pub fn new(tokenizer: &'a Tokenizer, prompt: &[i64], stop: &'a [String]) -> Result<Self> {
        let mut stream = TextStream::new(tokenizer);
        for &id in prompt {
            stream.push(id)?;
        }
        Ok(Continuation {
            stream,
            stop,
            text: String::new(),
            error: None,
        })
    }

    /// Adds a generated token; `Break` once the text holds a stop string
    /// (or on a decoding error), for the generator's callback.
    pub fn push(&mut self, id: i64) -> ControlFlow<()> {
        match self.stream.push(id) {
            Ok(piece) => {
                self.text.push_str(&piece);
                // A stop string that is new ends within the new piece: only
                // the text's tail is searched, not the whole text each token.
                let tail = |len: usize| {
                    let mut from = self.text.len().saturating_sub(len);
                    while !self.text.is_char_boundary(from) {
                        from -= 1;
                    }
                    &self.text[from..]
                };
                let stop = |s: &String| tail(piece.len() + s.len()).contains(s.as_str());
                match self.stop.iter().any(stop) {
                    true => ControlFlow::Break(()),
                    false => ControlFlow::Continue(()),
                }
            }
            Err(e) => {
                self.error.get_or_insert(e);
                ControlFlow::Break(())
            }
        }
    }

    /// The text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The generated text, or the first decoding error.
    pub fn finish(self) -> Result<String> {
        self.error.map_or(Ok(self.text), Err)
    }
}

/// The decoder behind a [`TextStream`].
enum Stream<'a> {
    Char(&'a CharTokenizer),
    Incremental {
        decoder: Box<
            tokenizers::DecodeStream<
                'a,
                tokenizers::ModelWrapper,
                tokenizers::NormalizerWrapper,
                tokenizers::PreTokenizerWrapper,
                tokenizers::PostProcessorWrapper,
                tokenizers::DecoderWrapper,
            >,
        >,
        vocab_size: i64,
    },
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Stream::Char(_) => f.write_str("TextStream(characters)"),
            Stream::Incremental { vocab_size, .. } => {
                write!(f, "TextStream(incremental, vocab_size {vocab_size})")
            }
        }
    }
}

impl<'a> TextStream<'a> {
    /// A stream that decodes as `tokenizer`'s [`Tokenizer::decode`] does
    /// (a pretrained tokenizer leaving its special tokens out).
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        let inner = match tokenizer {
            Tokenizer::Char(t) => Stream::Char(t),
            Tokenizer::Bpe(t) => Stream::Incremental {
                decoder: Box::new(t.inner().decode_stream(false)),
                vocab_size: t.vocab_size(),
            },
            Tokenizer::Hf(t) => Stream::Incremental {
                decoder: Box::new(t.inner().decode_stream(true)),
                vocab_size: t.vocab_size(),
            },
        };
        TextStream {
            inner,
            vocab_size: tokenizer.vocab_size(),
            unknown: 0,
        }
    }

    /// The text that `id` adds (possibly empty). An id at or past the
    /// vocabulary adds nothing (warned about once per stream, see
    /// [`TextStream`]); a negative id is [`MoeError::TokenOutOfVocab`].
    pub fn push(&mut self, id: i64) -> Result<String> {
        if id >= self.vocab_size {
            if self.unknown == 0 {
                warn_unknown(&[id], self.vocab_size);
            }
            self.unknown += 1;
            return Ok(String::new());
        }
        match &mut self.inner {
            Stream::Char(t) => Ok(t.decode_one(id)?.to_string()),
            Stream::Incremental {
                decoder,
                vocab_size,
            } => {
                let id = vocab_ids(&[id], *vocab_size)?[0];
                decoder
                    .step(id)
                    .map(Option::unwrap_or_default)
                    .map_err(|e| MoeError::Encode(format!("incremental decoding: {e}")))
            }
        }
    }

    /// How many ids pushed so far were at or past the vocabulary, and so
    /// added no text.
    pub fn unknown_ids(&self) -> usize {
        self.unknown
    }
}
