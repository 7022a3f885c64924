//! KV-cached generation against full recomputation.

#[path = "../../moe-train/tests/common.rs"]
mod common;

use common::tiny_config;
use moe_models::{
    generate, generate_batch, generate_recompute, generate_with, CausalLm, DecoderConfig,
    DecoderModel, DecoderPreset, GenerateOptions, MakeMoeModel, Sampling,
};
use std::ops::ControlFlow;
use tch::{nn, Device, Kind, Tensor};

fn model(seed: i64) -> (nn::VarStore, MakeMoeModel) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(30)).unwrap();
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
        ..Sampling::default()
    };
    assert!(generate(&model, &[1], 3, bad, |_| {}).is_err());
    assert!(generate(&model, &[30], 3, Sampling::default(), |_| {}).is_err());
}

/// Probabilities from hand-chosen logits: `ln` of 0.5, 0.3, 0.15, 0.05.
fn four_token_logits() -> Tensor {
    Tensor::from_slice(&[0.5f32, 0.3, 0.15, 0.05])
        .log()
        .unsqueeze(0)
}

#[test]
fn top_p_keeps_the_smallest_head_whose_mass_reaches_p() {
    let probs = |p| {
        Sampling {
            top_p: Some(p),
            ..Sampling::default()
        }
        .distribution(&four_token_logits(), &[])
    };
    let close = |t: Tensor, want: [f64; 4]| {
        let got = Vec::<f64>::try_from(t.squeeze().to_kind(Kind::Double)).unwrap();
        got.iter()
            .zip(want)
            .all(|(g, w)| (g - w).abs() < 1e-5)
            .then_some(())
            .ok_or(got)
    };
    // 0.5 + 0.3 = 0.8 >= 0.7: the first two, renormalised.
    close(probs(0.7), [0.625, 0.375, 0.0, 0.0]).unwrap();
    // 0.5 reaches 0.5: one token.
    close(probs(0.5), [1.0, 0.0, 0.0, 0.0]).unwrap();
    // p = 1 keeps everything.
    close(probs(1.0), [0.5, 0.3, 0.15, 0.05]).unwrap();
    let bad = Sampling {
        top_p: Some(0.0),
        ..Sampling::default()
    };
    assert!(bad.validate(4).is_err());
}

#[test]
fn the_repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let logits = Tensor::from_slice(&[2.0f32, 1.5, -1.0, 0.0]).unsqueeze(0);
    let penalised = Sampling {
        repetition_penalty: 2.0,
        top_k: Some(1),
        ..Sampling::default()
    };
    // Token 0 seen: 2.0 -> 1.0, so token 1 (1.5) becomes the greedy choice.
    assert_eq!(penalised.sample(&logits, &[0]).unwrap(), 1);
    assert_eq!(penalised.sample(&logits, &[]).unwrap(), 0);
    // By hand: [2/2, 1.5, -1*2, 0] after seeing tokens 0 and 2.
    let probs = Sampling {
        repetition_penalty: 2.0,
        ..Sampling::default()
    }
    .distribution(&logits, &[0, 2, 0]);
    let want = Tensor::from_slice(&[1.0f32, 1.5, -2.0, 0.0])
        .unsqueeze(0)
        .softmax(-1, Kind::Float);
    assert!((probs - want).abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn generation_stops_at_eos_or_when_the_callback_says_so() {
    let (_vs, model) = model(34);
    let prompt = [4i64, 9, 2];
    let greedy = generate(&model, &prompt, 12, Sampling::greedy(), |_| {}).unwrap();
    // EOS: the first greedy token that is an EOS ends the output, included.
    let eos = greedy[4];
    let first = greedy.iter().position(|&t| t == eos).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::greedy(),
        eos_token_ids: vec![eos],
    };
    let stopped = generate_with(&model, &prompt, &options, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(stopped, greedy[..=first]);
    // A callback that breaks after three tokens.
    let mut seen = 0;
    let options = GenerateOptions {
        eos_token_ids: Vec::new(),
        ..options
    };
    let out = generate_with(&model, &prompt, &options, |_| {
        seen += 1;
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(out, greedy[..3]);
}

#[test]
fn batches_of_one_length_need_no_padding_and_work_with_makemoe() {
    let (_vs, model) = model(35);
    let prompts = [vec![4i64, 9, 2], vec![1, 1, 7]];
    let options = GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::greedy(),
        eos_token_ids: Vec::new(),
    };
    let rows =
        generate_batch(&model, &prompts, &options, |_, _| ControlFlow::Continue(())).unwrap();
    for (row, prompt) in rows.iter().zip(&prompts) {
        assert_eq!(
            row,
            &generate(&model, prompt, 8, Sampling::greedy(), |_| {}).unwrap()
        );
    }
    // Different lengths would need padding, which absolute positions cannot take.
    let err = generate_batch(&model, &[vec![4, 9, 2], vec![1]], &options, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("learned and absolute"), "{err}");
}

#[test]
fn yuan_localized_filtering_refuses_padding() {
    let config = DecoderConfig {
        vocab_size: 30,
        hidden_size: 32,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 1,
        ..DecoderConfig::preset(DecoderPreset::Yuan)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), &config).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 2,
        sampling: Sampling::greedy(),
        eos_token_ids: Vec::new(),
    };
    let err = generate_batch(&model, &[vec![4, 9, 2], vec![1]], &options, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("localized filtering"), "{err}");
    // One length is fine.
    let rows = generate_batch(&model, &[vec![4, 9], vec![1, 3]], &options, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(rows.len(), 2);
}
