//! Helpers shared by this crate's test files.
#![allow(dead_code)]

use moe_data::{CharTokenizer, Dataset};
use moe_models::{DecoderConfig, DecoderPreset, MakeMoeConfig};
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

/// A small Mixtral-style decoder (2 layers of width 32, 4 experts, top-2)
/// for the multi-process tests.
pub fn small_mixtral(vocab_size: i64) -> DecoderConfig {
    DecoderConfig {
        vocab_size,
        hidden_size: 32,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        num_local_experts: 4,
        num_experts_per_tok: 2,
        ..DecoderConfig::preset(DecoderPreset::Mixtral)
    }
}

/// makeMoE's 90/10 split of the character-encoded corpus, on the CPU.
pub fn corpus_dataset(tok: &CharTokenizer, text: &str, block_size: i64) -> Dataset {
    let tokens = tok
        .encode(text)
        .expect("the corpus encodes with its own tokenizer");
    Dataset::new(&tokens, tok.vocab_size(), 0.9, block_size, Device::Cpu).unwrap()
}
