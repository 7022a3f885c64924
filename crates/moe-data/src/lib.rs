//! Text data of `moe-layers`: makeMoE's character tokenizer, a byte-level
//! BPE tokenizer trained with Hugging Face `tokenizers`, and [`Dataset`], a
//! token stream split into training and validation parts and sampled into
//! [`Batch`]es on the training device.

mod bpe;
mod dataset;
mod tokenizer;

pub use bpe::BpeTokenizer;
pub use dataset::{Batch, Dataset, Split};
pub use tokenizer::{CharTokenizer, TextStream, Tokenizer, TokenizerConfig, TokenizerKind};
