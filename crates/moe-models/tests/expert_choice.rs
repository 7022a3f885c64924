//! Expert choice routing in the language models. The causal form (each
//! expert chooses among the tokens at one position) never lets a later
//! token move an earlier output, in makeMoE and in the decoder, while the
//! paper's form (choosing among every token) does, which shows that the
//! test can fail. KV-cached decoding equals the full forward pass, and one
//! sequence (generation) is routed by the documented top-k rule.

#[path = "../../moe-train/tests/common.rs"]
mod common;
mod support;

use common::tiny_config;
use moe_models::{
    CausalLm, DecoderConfig, DecoderModel, DecoderPreset, MakeMoeConfig, MakeMoeModel, ModelCache,
};
use moe_routers::{ExpertChoiceScope, Gate, RouterConfig};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// libtorch's generator is global: the tests of this file seed and draw
/// under this lock.
fn rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const VOCAB: i64 = 20;

fn gate(scope: ExpertChoiceScope) -> Gate {
    Gate::ExpertChoice {
        capacity_factor: 1.0,
        scope,
    }
}

/// makeMoE, 2 layers of 4 experts, top-2 compute: with B = 4 sequences,
/// C_t = floor(4 * 2 / 4) = 2 tokens per expert and position.
fn makemoe(scope: ExpertChoiceScope) -> (nn::VarStore, MakeMoeModel) {
    let config = MakeMoeConfig {
        router: RouterConfig::with_gate(gate(scope)),
        ..tiny_config(VOCAB)
    };
    tch::manual_seed(31);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    (vs, model)
}

/// Mixtral's layout, small, 8 experts, top-2 compute: with B = 4,
/// C_t = floor(4 * 2 / 8) = 1.
fn decoder(scope: ExpertChoiceScope) -> (nn::VarStore, DecoderModel) {
    let config = DecoderConfig {
        router: RouterConfig {
            bias: false,
            ..RouterConfig::with_gate(gate(scope))
        },
        ..support::small_decoder(DecoderPreset::Mixtral, VOCAB)
    };
    tch::manual_seed(32);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), &config).unwrap();
    (vs, model)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Over every other token at the last position of sequence 0: the largest
/// move of the logits at the earlier positions (of every sequence), and the
/// smallest move at the changed position itself.
fn later_token_effect(model: &dyn CausalLm, idx: &Tensor) -> (f64, f64) {
    let t = idx.size()[1];
    let out = model.forward_t(idx, false).unwrap();
    assert!(
        out.routings.iter().all(|r| r.top_k.is_none()),
        "the batch should be routed by expert choice"
    );
    let before = out.logits.narrow(1, 0, t - 1);
    let old = idx.int64_value(&[0, t - 1]);
    let (mut earlier, mut own) = (0f64, f64::INFINITY);
    for token in (0..VOCAB).filter(|&v| v != old) {
        let changed = idx.copy();
        let _ = changed.get(0).get(t - 1).fill_(token);
        let logits = model.forward_t(&changed, false).unwrap().logits;
        earlier = earlier.max(max_diff(&logits.narrow(1, 0, t - 1), &before));
        own = own.min(max_diff(
            &logits.narrow(1, t - 1, 1),
            &out.logits.narrow(1, t - 1, 1),
        ));
    }
    (earlier, own)
}

fn check_causality(label: &str, causal: &dyn CausalLm, paper: &dyn CausalLm, idx: &Tensor) {
    let (earlier, own) = later_token_effect(causal, idx);
    assert!(
        earlier < 1e-5,
        "{label}, per position: a later token moved earlier logits by {earlier}"
    );
    assert!(
        own > 1e-4,
        "{label}: the changed position ignored its token"
    );
    let (earlier, _) = later_token_effect(paper, idx);
    assert!(
        earlier > 1e-4,
        "{label}, all tokens: a later token should move earlier logits (it moved them by \
         {earlier}), or this test could not fail"
    );
}

#[test]
fn makemoe_per_position_expert_choice_is_causal_and_all_tokens_is_not() {
    let rng = rng();
    let (_a, causal) = makemoe(ExpertChoiceScope::PerPosition);
    let (_b, paper) = makemoe(ExpertChoiceScope::AllTokens);
    let idx = Tensor::randint(VOCAB, [4, 16], (Kind::Int64, Device::Cpu));
    drop(rng);
    check_causality("makeMoE", &causal, &paper, &idx);
}

#[test]
fn decoder_per_position_expert_choice_is_causal_and_all_tokens_is_not() {
    let rng = rng();
    let (_a, causal) = decoder(ExpertChoiceScope::PerPosition);
    let (_b, paper) = decoder(ExpertChoiceScope::AllTokens);
    let idx = Tensor::randint(VOCAB, [4, 12], (Kind::Int64, Device::Cpu));
    drop(rng);
    check_causality("decoder", &causal, &paper, &idx);
}

/// A position's routing reads only the tokens at that position, so decoding
/// with a KV cache (a few positions at a time, all B rows) routes as the
/// full forward pass does. One sequence has C_t = 0: each token takes the
/// top-k of its scores, in generation and in the full pass alike.
#[test]
fn cached_decoding_and_generation_follow_the_full_forward_pass() {
    let rng = rng();
    let (_vs, model) = decoder(ExpertChoiceScope::PerPosition);
    let idx = Tensor::randint(VOCAB, [4, 20], (Kind::Int64, Device::Cpu));
    drop(rng);
    let full = model.forward_t(&idx, false).unwrap().logits;
    let mut cache = ModelCache::default();
    let mut parts = Vec::new();
    for (start, len) in [(0, 7), (7, 1), (8, 5), (13, 1), (14, 6)] {
        let out = model
            .forward_cached(&idx.narrow(1, start, len), &mut cache)
            .unwrap();
        assert!(out.routings.iter().all(|r| r.top_k.is_none()));
        parts.push(out.logits);
    }
    let diff = max_diff(&Tensor::cat(&parts, 1), &full);
    assert!(diff < 1e-4, "cached logits differ by {diff}");

    // Batch size 1: the per-token top-k rule, with k = 2.
    let one = model.forward_t(&idx.narrow(0, 0, 1), false).unwrap();
    for r in &one.routings {
        assert_eq!(r.top_k, Some(2));
        assert_eq!(r.expert_counts().sum(Kind::Int64).int64_value(&[]), 20 * 2);
    }
    // Greedy generation with the cache equals recomputing the whole context.
    let prompt = [3i64, 14, 15, 9];
    support::assert_cached_greedy_is_argmax("expert choice", &model, &prompt, 12);
}
