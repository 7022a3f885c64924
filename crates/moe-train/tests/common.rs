//! Helpers shared by this crate's test files.
#![allow(dead_code)]

use moe_data::{CharTokenizer, Dataset};
use moe_models::MakeMoeConfig;
use tch::Device;

pub fn corpus() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/tinyshakespeare.txt"
    );
    std::fs::read_to_string(path).expect("the bundled corpus data/tinyshakespeare.txt")
}

/// A small model for fast tests.
pub fn tiny_config(vocab_size: i64) -> MakeMoeConfig {
    MakeMoeConfig {
        vocab_size,
        block_size: 16,
        n_embd: 32,
        n_head: 4,
        n_layer: 2,
        num_experts: 4,
        top_k: 2,
        ..MakeMoeConfig::default()
    }
}

/// makeMoE's 90/10 split of the character-encoded corpus, on the CPU.
pub fn corpus_dataset(tok: &CharTokenizer, text: &str, block_size: i64) -> Dataset {
    let tokens = tok
        .encode(text)
        .expect("the corpus encodes with its own tokenizer");
    Dataset::new(&tokens, tok.vocab_size(), 0.9, block_size, Device::Cpu).unwrap()
}
