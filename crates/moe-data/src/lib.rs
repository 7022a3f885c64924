//! Text data of `moe-layers`: makeMoE's character tokenizer, a byte-level
//! BPE tokenizer trained with Hugging Face `tokenizers`, pretrained
//! tokenizers read from a checkpoint's `tokenizer.json` ([`HfTokenizer`]),
//! their vocabulary extended with pieces trained on new text
//! ([`HfTokenizer::extend_vocab`]), and [`Dataset`], a
//! token stream split into training and validation parts and sampled into
//! [`Batch`]es on the training device.
#![warn(missing_docs)]

mod bpe;
mod dataset;
mod extend;
mod hf;
mod tokenizer;

pub use bpe::BpeTokenizer;
pub use dataset::{Batch, Dataset, Split};
pub use extend::{ExtendOptions, VocabExtension};
pub use hf::HfTokenizer;
pub use tokenizer::{
    CharTokenizer, Continuation, TextStream, Tokenizer, TokenizerConfig, TokenizerKind,
};
