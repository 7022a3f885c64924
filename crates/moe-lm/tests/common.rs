//! Helpers shared by this crate's test files.
#![allow(dead_code)]

use moe_lm::ModelConfig;

pub fn corpus() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/tinyshakespeare.txt"
    );
    std::fs::read_to_string(path).expect("the bundled corpus data/tinyshakespeare.txt")
}

/// A small model for fast tests.
pub fn tiny_config(vocab_size: i64) -> ModelConfig {
    ModelConfig {
        vocab_size,
        block_size: 16,
        n_embd: 32,
        n_head: 4,
        n_layer: 2,
        num_experts: 4,
        top_k: 2,
        ..ModelConfig::default()
    }
}
