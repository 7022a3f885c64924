use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};

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

    pub fn vocab_size(&self) -> i64 {
        self.chars.len() as i64
    }

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
