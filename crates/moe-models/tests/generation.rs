//! KV-cached generation against full recomputation.

#[path = "../../moe-train/tests/common.rs"]
mod common;

use common::tiny_config;
use moe_models::{generate, generate_recompute, generate_until, CausalLm, MakeMoeModel, Sampling};
use tch::{nn, Device, Kind, Tensor};

fn model(seed: i64) -> (nn::VarStore, MakeMoeModel) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &tiny_config(30)).unwrap();
    (vs, model)
}

/// Greedy decoding by running the whole window through `forward_t` for
/// every token, with `generate`'s window rule: when the window would exceed
/// `block_size`, it restarts from the last `block_size / 2` tokens.
fn greedy_reference(model: &MakeMoeModel, prompt: &[i64], n: usize) -> Vec<i64> {
    let block = model.config().block_size as usize;
    let mut ctx = prompt.to_vec();
    let mut start = ctx.len().saturating_sub(block);
    let mut out = Vec::new();
    for _ in 0..n {
        let idx = Tensor::from_slice(&ctx[start..]).unsqueeze(0);
        let logits = model.forward_t(&idx, false).unwrap().logits;
        let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
        ctx.push(next);
        out.push(next);
        if ctx.len() - start > block {
            start = ctx.len() - block / 2;
        }
    }
    out
}

#[test]
fn greedy_cached_generation_equals_full_recomputation_token_for_token() {
    let (_vs, model) = model(31);
    // Within the context (3 + 13 = 16 = block_size): also makeMoE's recompute.
    let prompt = [4i64, 9, 2];
    let cached = generate(&model, &prompt, 13, Sampling::greedy(), |_| {}).unwrap();
    assert_eq!(cached, greedy_reference(&model, &prompt, 13));
    let recomputed = generate_recompute(&model, &prompt, 13, Sampling::greedy(), |_| {}).unwrap();
    assert_eq!(cached, recomputed);
    // Far past the context, through several window restarts.
    let cached = generate(&model, &prompt, 60, Sampling::greedy(), |_| {}).unwrap();
    assert_eq!(cached, greedy_reference(&model, &prompt, 60));
    // A prompt longer than the context keeps its last block_size tokens.
    let long: Vec<i64> = (0..40).map(|i| (i * 7) % 30).collect();
    let cached = generate(&model, &long, 20, Sampling::greedy(), |_| {}).unwrap();
    assert_eq!(cached, greedy_reference(&model, &long, 20));
    assert!(cached.iter().any(|&t| t != cached[0]), "degenerate output");
}

#[test]
fn generation_stops_after_a_stop_token() {
    let (_vs, model) = model(33);
    let prompt = [4i64, 9, 2];
    let all = generate(&model, &prompt, 30, Sampling::greedy(), |_| {}).unwrap();
    // Stop at the third token's id: the output ends at its first occurrence.
    let stop = all[2];
    let first = all.iter().position(|&t| t == stop).unwrap();
    let mut streamed = Vec::new();
    let cut = generate_until(&model, &prompt, 30, Sampling::greedy(), &[stop], |t| {
        streamed.push(t)
    })
    .unwrap();
    assert_eq!(cut, all[..=first]);
    assert_eq!(streamed, cut);
    // Without stop tokens it is `generate`.
    let same = generate_until(&model, &prompt, 30, Sampling::greedy(), &[], |_| {}).unwrap();
    assert_eq!(same, all);
}

#[test]
fn cached_logits_equal_the_full_forward_at_every_position() {
    let (_vs, model) = model(32);
    let idx = Tensor::randint(30, [2, 16], (Kind::Int64, Device::Cpu));
    let full = model.forward_t(&idx, false).unwrap().logits;
    let mut cache = moe_models::ModelCache::new(2);
    // A prefill of 5 positions, then one position at a time.
    let mut parts = vec![
        model
            .forward_cached(&idx.narrow(1, 0, 5), &mut cache)
            .unwrap()
            .logits,
    ];
    for t in 5..16 {
        parts.push(
            model
                .forward_cached(&idx.narrow(1, t, 1), &mut cache)
                .unwrap()
                .logits,
        );
    }
    let cached = Tensor::cat(&parts, 1);
    let diff = (cached - &full).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "cached logits differ by {diff}");
    let err = model
        .forward_cached(&idx.narrow(1, 0, 1), &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("longer than the context"), "{err}");
}

#[test]
fn sampling_streams_every_token_and_rejects_bad_settings() {
    let (_vs, model) = model(33);
    let mut streamed = Vec::new();
    let out = generate(&model, &[], 25, Sampling::default(), |t| streamed.push(t)).unwrap();
    assert_eq!(out, streamed);
    assert_eq!(out.len(), 25);
    assert!(out.iter().all(|&t| (0..30).contains(&t)));
    let bad = Sampling {
        temperature: 0.0,
        top_k: None,
    };
    assert!(generate(&model, &[1], 3, bad, |_| {}).is_err());
    assert!(generate(&model, &[30], 3, Sampling::default(), |_| {}).is_err());
}
