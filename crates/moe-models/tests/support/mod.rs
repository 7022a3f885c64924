//! What the model tests share: a small decoder config and the greedy
//! decoding check. Not every test binary uses all of it.
#![allow(dead_code)]

use moe_models::{generate, CausalLm, DecoderConfig, DecoderPreset, Sampling};
use tch::Tensor;

/// A preset on small sizes, fast enough for tests: 2 layers of width 32,
/// 4 query and 2 KV heads, 24 positions; the preset's MoE and shared-expert
/// widths, where it has them, shrunk to 16 and 24. Per-layer settings
/// keep the preset's first layer and give the second its NoPE layer's
/// (Llama 4: layer 0 chunked with RoPE, layer 1 without RoPE, attending to
/// all).
pub fn small_decoder(preset: DecoderPreset, vocab_size: i64) -> DecoderConfig {
    let c = DecoderConfig::preset(preset);
    let (layer_types, nope_layers) = match c.nope_layers.first() {
        Some(&nope) => (
            vec![c.layer_types[0], c.layer_types[nope as usize]],
            vec![1],
        ),
        None => (c.layer_types.iter().copied().take(2).collect(), Vec::new()),
    };
    DecoderConfig {
        layer_types,
        nope_layers,
        vocab_size,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 24,
        intermediate_size: 48,
        moe_intermediate_size: c.moe_intermediate_size.map(|_| 16),
        shared_expert_intermediate_size: c.shared_expert_intermediate_size.map(|_| 24),
        ..c
    }
}

/// Greedy generation with the KV cache picks, token for token, the argmax
/// of the full forward pass over the whole context so far.
/// `label` names the model in a failure.
pub fn assert_cached_greedy_is_argmax(
    label: &str,
    model: &dyn CausalLm,
    prompt: &[i64],
    new_tokens: usize,
) {
    let cached = generate(model, prompt, new_tokens, Sampling::greedy(), |_| {}).unwrap();
    assert_eq!(cached.len(), new_tokens, "{label}");
    let mut context = prompt.to_vec();
    for &token in &cached {
        let logits = model
            .forward_t(&Tensor::from_slice(&context).unsqueeze(0), false)
            .unwrap()
            .logits;
        let want = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
        assert_eq!(token, want, "{label}: after {context:?}");
        context.push(token);
    }
}
