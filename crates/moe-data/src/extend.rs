//! Vocabulary extension of a pretrained BPE tokenizer, as Chinese-LLaMA
//! (Cui et al. 2023, arXiv 2304.08177) and Chinese-Mixtral (Cui & Yao 2024,
//! arXiv 2403.01851) extended their base models' tokenizers: a BPE is
//! trained on text in the new language and its pieces are merged into the
//! old vocabulary and merges, after the old ones.

use crate::HfTokenizer;
use moe_core::{MoeError, Result};
use serde_json::{json, Map, Value};
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;

/// How [`HfTokenizer::extend_vocab`] trains and chooses the new pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendOptions {
    /// At most this many pieces are added: the new characters first (most
    /// frequent in the text first), then the merged pieces in the order the
    /// BPE learned them (most frequent pair first).
    pub max_new_pieces: usize,
    /// The BPE learns no merge of a pair seen fewer times in the text (the
    /// trainer's `min_frequency`). New characters are added however rarely
    /// they occur, so that no character of the text stays unknown.
    pub min_frequency: u64,
}

impl Default for ExtendOptions {
    /// Up to 1000 pieces, merges of pairs seen at least twice.
    fn default() -> Self {
        ExtendOptions {
            max_new_pieces: 1000,
            min_frequency: 2,
        }
    }
}

/// What [`HfTokenizer::extend_vocab`] made: the extended tokenizer and what
/// it added.
#[derive(Debug, Clone)]
pub struct VocabExtension {
    /// The extended tokenizer: the old one with `pieces` at ids
    /// `old_vocab_size..new_vocab_size()` and the merges that build them.
    pub tokenizer: HfTokenizer,
    /// The old tokenizer's [`HfTokenizer::vocab_size`].
    pub old_vocab_size: i64,
    /// The new pieces; `pieces[i]` has id `old_vocab_size + i`.
    pub pieces: Vec<String>,
    /// How many of the pieces are single characters (the rest are merges).
    pub new_chars: usize,
    /// Merges appended after the old ones.
    pub merges: usize,
    /// Pieces of the trained BPE made only of characters the old vocabulary
    /// has, left out: their merges would change how covered text is split.
    pub skipped_covered: usize,
}

impl VocabExtension {
    /// The extended vocabulary size, `old_vocab_size + pieces.len()`.
    pub fn new_vocab_size(&self) -> i64 {
        self.old_vocab_size + self.pieces.len() as i64
    }

    /// The ids of the new pieces.
    pub fn new_ids(&self) -> Range<i64> {
        self.old_vocab_size..self.new_vocab_size()
    }
}

impl HfTokenizer {
    /// Adds pieces learned on `text` to this BPE tokenizer, as
    /// Chinese-LLaMA and Chinese-Mixtral merged a SentencePiece model
    /// trained on Chinese text into LLaMA's and Mixtral's.
    ///
    /// A BPE is trained on `text` with the `tokenizers` library through
    /// this tokenizer's own normalizer and pre-tokenizer (so pieces carry
    /// the same `▁` word marks) and with its continuing-subword prefix and
    /// end-of-word suffix. Its pieces become real BPE tokens: each new piece
    /// is appended to the model's vocabulary at the next free id
    /// (`vocab_size()..`, old ids keep their meaning) and the merge that
    /// builds it is appended after the old merges (old merges keep their
    /// priority).
    ///
    /// Only pieces that contain a character the old vocabulary has no
    /// single-character token for are taken, with the merges that produce
    /// them (and whose two parts exist). Text whose characters all have
    /// tokens ("covered" text: it encodes without unknown or byte-fallback
    /// tokens) then encodes to the same ids as before: its symbols only
    /// ever hold old characters, so no new merge can apply to them, and the
    /// old merges keep their ranks. A merge of old characters only (a new
    /// English word in the text, say) would re-split old text, and is left
    /// out ([`VocabExtension::skipped_covered`] counts them); so a byte-level
    /// BPE (GPT-2's, which covers every string) cannot be extended this way
    /// (the error below). Pieces whose parts the extended vocabulary lacks
    /// are left out too (their merge could never apply).
    ///
    /// The BPE is trained with a merge budget of `max_new_pieces`, doubled
    /// until enough pieces qualify or the text has no pair of
    /// `min_frequency` left (each round trains anew: the cost is at most
    /// about twice that of the last round).
    ///
    /// Errors: `max_new_pieces` 0 ([`MoeError::Config`]); a model other than
    /// BPE ([`MoeError::Config`]: WordPiece and Unigram have no merges to
    /// append to); an empty text or a text with no character outside the
    /// vocabulary ([`MoeError::Data`]).
    pub fn extend_vocab(&self, text: &str, options: &ExtendOptions) -> Result<VocabExtension> {
        if options.max_new_pieces == 0 {
            return Err(MoeError::config(
                "ExtendOptions::max_new_pieces must be at least 1",
            ));
        }
        if text.is_empty() {
            return Err(MoeError::Data(
                "cannot extend the vocabulary from an empty text".into(),
            ));
        }
        let mut json = self.json_value()?;
        let old = OldBpe::read(&json, self)?;
        let distinct_chars = text.chars().collect::<HashSet<_>>().len();
        // Each merge shortens some word of the text (pre-tokenized, so
        // perhaps with a word mark per word) by a symbol: a bound on merges.
        let max_merges = 2 * text.chars().count() + 1;
        let mut budget = options.max_new_pieces.min(max_merges);
        let plan = loop {
            let requested = distinct_chars + 1 + budget;
            let (trained, learned) = self.train_pieces(text, requested, &old, options)?;
            let plan = old.plan(&trained, text, options.max_new_pieces);
            let done = plan.pieces.len() >= options.max_new_pieces;
            if done || learned < requested || budget >= max_merges {
                break plan;
            }
            budget = (2 * budget).min(max_merges);
        };
        if plan.pieces.is_empty() {
            return Err(MoeError::Data(format!(
                "the text has no character outside the tokenizer's vocabulary of {}: there is \
                 nothing to add without changing how text it already covers is split",
                self.vocab_size()
            )));
        }
        let old_vocab_size = self.vocab_size();
        let model = json["model"]
            .as_object_mut()
            .expect("OldBpe::read checked the model");
        let vocab = model["vocab"]
            .as_object_mut()
            .expect("OldBpe::read checked the vocabulary");
        for (i, piece) in plan.pieces.iter().enumerate() {
            vocab.insert(piece.clone(), json!(old_vocab_size + i as i64));
        }
        let merges: Vec<Value> = old
            .merges
            .iter()
            .chain(&plan.merges)
            .map(|(a, b)| json!([a, b]))
            .collect();
        model.insert("merges".into(), Value::Array(merges));
        let inner: tokenizers::Tokenizer = json.to_string().parse().map_err(|e| {
            MoeError::Data(format!("the extended tokenizer does not load back: {e}"))
        })?;
        let tokenizer = HfTokenizer::new(inner);
        let extension = VocabExtension {
            tokenizer,
            old_vocab_size,
            new_chars: plan.new_chars,
            merges: plan.merges.len(),
            skipped_covered: plan.skipped_covered,
            pieces: plan.pieces,
        };
        if extension.tokenizer.vocab_size() != extension.new_vocab_size() {
            return Err(MoeError::Data(format!(
                "the extended tokenizer has {} ids, expected {} old + {} new (ids must be \
                 contiguous)",
                extension.tokenizer.vocab_size(),
                old_vocab_size,
                extension.pieces.len()
            )));
        }
        Ok(extension)
    }

    /// `tokenizer.json` as a JSON value.
    fn json_value(&self) -> Result<Value> {
        serde_json::from_str(&self.to_json(false)?)
            .map_err(|e| MoeError::Data(format!("cannot read the tokenizer's JSON back: {e}")))
    }

    /// Trains a BPE of `vocab_size` tokens on `text` through this
    /// tokenizer's pipeline; returns its vocabulary in id order and merges
    /// in rank order, and how many tokens it learned.
    fn train_pieces(
        &self,
        text: &str,
        vocab_size: usize,
        old: &OldBpe,
        options: &ExtendOptions,
    ) -> Result<(TrainedBpe, usize)> {
        let mut builder = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(options.min_frequency)
            .show_progress(false);
        if let Some(prefix) = &old.prefix {
            builder = builder.continuing_subword_prefix(prefix.clone());
        }
        if let Some(suffix) = &old.suffix {
            builder = builder.end_of_word_suffix(suffix.clone());
        }
        let mut trainer: TrainerWrapper = builder.build().into();
        let mut pipeline = self.inner().clone();
        pipeline.with_model(BPE::default());
        pipeline
            .train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| MoeError::Data(format!("BPE training on the new text failed: {e}")))?;
        let model = serde_json::to_value(pipeline.get_model())
            .map_err(|e| MoeError::Data(format!("cannot serialise the trained BPE: {e}")))?;
        let mut vocab: Vec<(String, u64)> = model["vocab"]
            .as_object()
            .map(|v| {
                v.iter()
                    .filter_map(|(t, id)| Some((t.clone(), id.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        vocab.sort_by_key(|(_, id)| *id);
        let learned = vocab.len();
        let trained = TrainedBpe {
            vocab: vocab.into_iter().map(|(t, _)| t).collect(),
            merges: merges_of(&model, "the trained BPE")?,
        };
        Ok((trained, learned))
    }
}

/// A trained BPE: tokens in id order, merges in rank order.
struct TrainedBpe {
    vocab: Vec<String>,
    merges: Vec<(String, String)>,
}

/// The old BPE model: what the extension must keep.
struct OldBpe {
    /// Every token, of the model and added ones.
    tokens: HashSet<String>,
    /// Characters the model has a token for (its alphabet).
    covered: HashSet<char>,
    merges: Vec<(String, String)>,
    prefix: Option<String>,
    suffix: Option<String>,
}

/// Which pieces and merges to add.
struct Plan {
    pieces: Vec<String>,
    new_chars: usize,
    merges: Vec<(String, String)>,
    skipped_covered: usize,
}

impl OldBpe {
    fn read(json: &Value, tokenizer: &HfTokenizer) -> Result<Self> {
        let model = json.get("model").and_then(Value::as_object);
        let kind = model
            .and_then(|m| m.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let model = match model {
            Some(m) if kind == "BPE" && m.get("vocab").is_some_and(Value::is_object) => m,
            _ => {
                return Err(MoeError::config(format!(
                    "extending a vocabulary needs a BPE tokenizer (vocabulary and merges to \
                     append to), this tokenizer's model is {kind}"
                )))
            }
        };
        let text = |key: &str| model.get(key).and_then(Value::as_str).map(String::from);
        let (prefix, suffix) = (
            text("continuing_subword_prefix"),
            text("end_of_word_suffix"),
        );
        let vocab: &Map<String, Value> = model["vocab"].as_object().expect("checked above");
        let mut old = OldBpe {
            tokens: tokenizer.inner().get_vocab(true).into_keys().collect(),
            covered: HashSet::new(),
            merges: merges_of(json.get("model").expect("checked above"), "the tokenizer")?,
            prefix,
            suffix,
        };
        old.covered = vocab
            .keys()
            .filter_map(|t| single_char(old.bare(t)))
            .collect();
        Ok(old)
    }

    /// A piece without the continuing-subword prefix and end-of-word suffix.
    fn bare<'a>(&self, piece: &'a str) -> &'a str {
        let piece = match &self.prefix {
            Some(p) => piece.strip_prefix(p.as_str()).unwrap_or(piece),
            None => piece,
        };
        match &self.suffix {
            Some(s) => piece.strip_suffix(s.as_str()).unwrap_or(piece),
            None => piece,
        }
    }

    /// Whether a piece holds a character outside the old alphabet.
    fn is_new(&self, piece: &str) -> bool {
        self.bare(piece).chars().any(|c| !self.covered.contains(&c))
    }

    /// The token a merge of `a` and `b` makes (`b` loses its prefix).
    fn merged(&self, a: &str, b: &str) -> String {
        let b = match &self.prefix {
            Some(p) => b.strip_prefix(p.as_str()).unwrap_or(b),
            None => b,
        };
        format!("{a}{b}")
    }

    /// New characters (most frequent in `text` first), then the trained
    /// merges that make new pieces from known parts, up to `max` pieces.
    fn plan(&self, trained: &TrainedBpe, text: &str, max: usize) -> Plan {
        let mut counts: HashMap<char, usize> = HashMap::new();
        for c in text.chars() {
            *counts.entry(c).or_default() += 1;
        }
        let mut chars: Vec<&String> = trained
            .vocab
            .iter()
            .filter(|t| single_char(self.bare(t)).is_some())
            .filter(|t| !self.tokens.contains(t.as_str()) && self.is_new(t))
            .collect();
        chars.sort_by_key(|t| {
            let c = single_char(self.bare(t)).expect("filtered above");
            (Reverse(counts.get(&c).copied().unwrap_or(0)), c, t.len())
        });
        let mut known = self.tokens.clone();
        let mut pieces: Vec<String> = Vec::new();
        for t in chars.into_iter().take(max) {
            known.insert(t.clone());
            pieces.push(t.clone());
        }
        let new_chars = pieces.len();
        let old_merges: HashSet<&(String, String)> = self.merges.iter().collect();
        let mut merges = Vec::new();
        let mut skipped_covered = 0;
        for merge @ (a, b) in &trained.merges {
            let piece = self.merged(a, b);
            if !self.is_new(&piece) {
                skipped_covered += 1;
                continue;
            }
            if !known.contains(a) || !known.contains(b) || old_merges.contains(merge) {
                continue;
            }
            if !known.contains(&piece) {
                if pieces.len() >= max {
                    continue;
                }
                known.insert(piece.clone());
                pieces.push(piece);
            }
            merges.push(merge.clone());
        }
        Plan {
            pieces,
            new_chars,
            merges,
            skipped_covered,
        }
    }
}

/// The one character of `s`, if it has exactly one.
fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    }
}

/// A BPE model's merges: pairs `["a", "b"]` or the older strings `"a b"`.
fn merges_of(model: &Value, what: &str) -> Result<Vec<(String, String)>> {
    let bad = |m: &Value| {
        MoeError::Data(format!(
            "{what}'s BPE merges must be pairs [\"a\", \"b\"] or strings \"a b\", got {m}"
        ))
    };
    let Some(merges) = model.get("merges") else {
        return Ok(Vec::new());
    };
    let merges = merges.as_array().ok_or_else(|| bad(merges))?;
    merges
        .iter()
        .map(|m| match m {
            Value::String(s) => match s.split(' ').collect::<Vec<_>>().as_slice() {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(bad(m)),
            },
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                _ => Err(bad(m)),
            },
            _ => Err(bad(m)),
        })
        .collect()
}
