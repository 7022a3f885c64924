//! Logits that name no token (NaN, +inf, every one -inf) are errors naming
//! the generation step and the batch row, for greedy decoding and for
//! sampling, instead of libtorch's `multinomial` panicking; greedy decoding
//! is an argmax that draws nothing from the generator.

#[path = "../../moe-train/tests/common.rs"]
mod common;

use common::tiny_config;
use moe_core::MoeError;
use moe_models::{
    generate, generate_batch, generate_recompute, generate_with, GenerateOptions, MakeMoeModel,
    Sampling,
};
use std::ops::ControlFlow;
use tch::{nn, Device, Kind, Tensor};

const VOCAB: i64 = 30;

/// libtorch's generator is global and this file's tests run in parallel:
/// each holds this lock while it draws (one checks that greedy draws nothing).
fn rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn row(values: &[f32]) -> Tensor {
    Tensor::from_slice(values).unsqueeze(0)
}

fn sampled() -> Sampling {
    Sampling::default()
}

fn nucleus() -> Sampling {
    Sampling {
        top_p: Some(0.9),
        temperature: 0.7,
        repetition_penalty: 1.3,
        ..Sampling::default()
    }
}

/// The message of a [`MoeError::NonFinite`], or a failure naming what came instead.
fn diverged<T: std::fmt::Debug>(result: moe_core::Result<T>) -> String {
    match result {
        Err(MoeError::NonFinite(message)) => message,
        other => panic!("expected MoeError::NonFinite, got {other:?}"),
    }
}

#[test]
fn a_nan_or_inf_logit_is_an_error_for_greedy_and_for_sampling() {
    let _rng = rng();
    let nan = row(&[0.1, f32::NAN, 2.0, -1.0]);
    let inf = row(&[0.1, 0.5, f32::INFINITY, -1.0]);
    let no_token = row(&[f32::NEG_INFINITY; 4]);
    for sampling in [Sampling::greedy(), sampled(), nucleus()] {
        let label = format!("{sampling:?}");
        let message = diverged(sampling.sample(&nan, &[]));
        assert!(
            message.contains("NaN (1 of 4 logits)") && message.contains("row 0"),
            "{label}: {message}"
        );
        let message = diverged(sampling.sample(&inf, &[2]));
        assert!(
            message.contains("+inf (1 of 4 logits)") && message.contains("row 0"),
            "{label}: {message}"
        );
        let message = diverged(sampling.sample(&no_token, &[]));
        assert!(message.contains("all -inf"), "{label}: {message}");
        // Half-precision logits are checked as well.
        let message = diverged(sampling.sample(&nan.to_kind(Kind::BFloat16), &[]));
        assert!(message.contains("NaN"), "{label}: {message}");
    }
}

#[test]
fn a_lone_minus_inf_excludes_its_token() {
    let _rng = rng();
    let logits = row(&[3.0, f32::NEG_INFINITY, 2.9, 2.8]);
    assert_eq!(Sampling::greedy().sample(&logits, &[]).unwrap(), 0);
    tch::manual_seed(5);
    for _ in 0..200 {
        let id = sampled().sample(&logits, &[]).unwrap();
        assert!(id != 1 && (0..4).contains(&id), "{id}");
    }
}

#[test]
fn greedy_is_an_argmax_that_draws_nothing() {
    let _rng = rng();
    let logits = row(&[0.3, 2.0, 1.9, -4.0]);
    // Whatever the temperature, top-p or penalty, top_k = 1 is the argmax
    // after the penalty (2.0 / 1.5 < 1.9 once token 1 was seen).
    let greedy = Sampling {
        temperature: 3.0,
        top_p: Some(0.2),
        repetition_penalty: 1.5,
        ..Sampling::greedy()
    };
    assert!(greedy.is_greedy() && !sampled().is_greedy());
    tch::manual_seed(11);
    let untouched = Tensor::rand([8], (Kind::Float, Device::Cpu));
    tch::manual_seed(11);
    assert_eq!(greedy.sample(&logits, &[]).unwrap(), 1);
    assert_eq!(greedy.sample(&logits, &[1]).unwrap(), 2);
    // The generator is where it was: no multinomial ran.
    let after = Tensor::rand([8], (Kind::Float, Device::Cpu));
    assert_eq!(
        Vec::<f32>::try_from(&after).unwrap(),
        Vec::<f32>::try_from(&untouched).unwrap()
    );
}

#[test]
fn extreme_settings_and_bad_shapes_are_errors_or_exact_not_panics() {
    let _rng = rng();
    // l / T would overflow f32 for T = 1e-30; (l - max) / T does not: the
    // draw is the argmax.
    let cold = Sampling {
        temperature: 1e-30,
        ..Sampling::default()
    };
    let logits = row(&[1.0, 3.0, 2.0]);
    tch::manual_seed(3);
    for _ in 0..20 {
        assert_eq!(cold.sample(&logits, &[]).unwrap(), 1);
    }
    // A penalty that divides a positive logit into +inf.
    let overflowing = Sampling {
        repetition_penalty: 1e-300,
        top_k: Some(1),
        ..Sampling::default()
    };
    let err = overflowing.sample(&logits, &[1]).unwrap_err();
    assert!(
        matches!(err, MoeError::Config(_)) && err.to_string().contains("overflow"),
        "{err}"
    );
    let too_many = Sampling {
        top_k: Some(4),
        ..Sampling::default()
    };
    assert!(matches!(
        too_many.sample(&logits, &[]),
        Err(MoeError::Config(_))
    ));
    let flat = Tensor::from_slice(&[1.0f32, 2.0]);
    assert!(matches!(
        sampled().sample(&flat, &[]),
        Err(MoeError::Shape { .. })
    ));
    let two_rows = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    assert!(matches!(
        sampled().sample(&two_rows, &[]),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        Sampling::greedy().sample(&logits, &[3]),
        Err(MoeError::TokenOutOfVocab { id: 3, .. })
    ));
}

fn model(seed: i64) -> (nn::VarStore, MakeMoeModel) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = MakeMoeModel::new(&vs.root(), tiny_config(VOCAB)).unwrap();
    (vs, model)
}

/// Sets one element of the variable `name` to NaN.
fn poison(vs: &nn::VarStore, name: &str, index: [i64; 2]) {
    let var = vs.variables()[name].shallow_clone();
    tch::no_grad(|| {
        let _ = var.get(index[0]).get(index[1]).fill_(f64::NAN);
    });
}

#[test]
fn a_model_with_one_nan_weight_fails_at_the_step_and_row_it_reaches() {
    let _rng = rng();
    let prompt = [4i64, 9, 2];
    let (vs, model) = model(41);
    let clean = generate(&model, &prompt, 12, Sampling::greedy(), |_| {}).unwrap();
    // The first new token that is not in the prompt: its embedding gets a
    // NaN, so the logits go NaN at the step after it is generated.
    let j = clean.iter().position(|t| !prompt.contains(t)).unwrap();
    let token = clean[j];
    poison(&vs, "tok_emb.weight", [token, 0]);
    let mut seen = Vec::new();
    let message = diverged(generate(&model, &prompt, 12, Sampling::greedy(), |t| {
        seen.push(t)
    }));
    assert!(
        message.contains(&format!("generation step {}", j + 1)) && message.contains("batch row 0"),
        "token {token} first generated at step {j}: {message}"
    );
    assert_eq!(seen, clean[..=j], "the tokens before it are unchanged");
    // The recomputing generator reports the same step.
    let message = diverged(generate_recompute(
        &model,
        &prompt,
        12,
        Sampling::greedy(),
        |_| {},
    ));
    assert!(
        message.contains(&format!("generation step {}", j + 1)),
        "{message}"
    );
    // Sampling as well, already at step 0 when the prompt holds the token.
    let options = GenerateOptions {
        max_new_tokens: 5,
        sampling: nucleus(),
        eos_token_ids: Vec::new(),
    };
    let message = diverged(generate_with(&model, &[token, 1], &options, |_| {
        ControlFlow::Continue(())
    }));
    assert!(
        message.contains("generation step 0") && message.contains("NaN"),
        "{message}"
    );
}

#[test]
fn a_batch_names_the_row_whose_logits_are_not_finite() {
    let _rng = rng();
    let (vs, model) = model(42);
    poison(&vs, "tok_emb.weight", [13, 5]);
    // Only row 1's prompt holds token 13.
    let prompts = [vec![4i64, 9, 2], vec![1, 13, 7]];
    for sampling in [Sampling::greedy(), sampled()] {
        let options = GenerateOptions {
            max_new_tokens: 4,
            sampling,
            eos_token_ids: Vec::new(),
        };
        let mut streamed = Vec::new();
        let message = diverged(generate_batch(&model, &prompts, &options, |r, t| {
            streamed.push((r, t));
            ControlFlow::Continue(())
        }));
        assert!(
            message.contains("generation step 0, batch row 1") && message.contains("NaN"),
            "{message}"
        );
        // Row 0 was sampled before row 1 failed.
        assert_eq!(streamed.len(), 1);
        assert_eq!(streamed[0].0, 0);
    }
    // A NaN in the output layer reaches every row at once: row 0 is named.
    poison(&vs, "lm_head.weight", [3, 0]);
    let options = GenerateOptions {
        max_new_tokens: 4,
        sampling: sampled(),
        eos_token_ids: Vec::new(),
    };
    let message = diverged(generate_batch(
        &model,
        &[vec![4i64, 9], vec![2, 2]],
        &options,
        |_, _| ControlFlow::Continue(()),
    ));
    assert!(
        message.contains("generation step 0, batch row 0"),
        "{message}"
    );
}
