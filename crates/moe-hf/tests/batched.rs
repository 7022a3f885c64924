//! Batched prompts, left-padded with an attention mask: every row computes
//! what its prompt alone computes, on the transformers checkpoints of every
//! family (grouped-query and latent attention, RoPE with and without
//! scaling).

mod common;

use common::{expected, fixture, load, max_abs_diff, FAMILIES};
use moe_models::{generate, generate_batch, CausalLm, GenerateOptions, Sampling};
use std::ops::ControlFlow;
use tch::Tensor;

/// The fixture's prompts (5, 7 and 9 tokens) left-padded into one batch:
/// the real positions' logits equal the unbatched run's and transformers'
/// (prefill and three cached steps), and greedy generation of the batch
/// gives every row's unbatched continuation, which is transformers' too.
#[test]
fn left_padded_rows_equal_their_unbatched_runs() {
    for name in FAMILIES {
        let pretrained = load(&fixture(name));
        let model = &pretrained.model;
        let want = expected(name);
        let prompts = &want.prompts;
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        let (mut ids, mut real) = (Vec::new(), Vec::new());
        for p in prompts {
            let pad = longest - p.len();
            ids.extend(std::iter::repeat_n(7i64, pad).chain(p.iter().copied()));
            real.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
        }
        let shape = [prompts.len() as i64, longest as i64];
        let mut cache = model.new_cache();
        cache
            .set_padding(&Tensor::from_slice(&real).view(shape))
            .unwrap();
        let batched = tch::no_grad(|| {
            model.forward_cached(&Tensor::from_slice(&ids).view(shape), &mut cache)
        })
        .unwrap()
        .logits;
        let mut alone_caches = Vec::new();
        for (b, p) in prompts.iter().enumerate() {
            let pad = (longest - p.len()) as i64;
            let rows = batched.get(b as i64).narrow(0, pad, p.len() as i64);
            let mut alone_cache = model.new_cache();
            let alone = tch::no_grad(|| {
                model.forward_cached(&Tensor::from_slice(p).unsqueeze(0), &mut alone_cache)
            })
            .unwrap()
            .logits
            .squeeze_dim(0);
            let diff = max_abs_diff(&rows, &alone);
            assert!(
                diff < 1e-5,
                "{name}, prompt {b}: prefill differs by {diff:e}"
            );
            let theirs = Tensor::from_slice(&want.logits[b].concat()).view([p.len() as i64, -1]);
            let diff = max_abs_diff(&rows, &theirs);
            assert!(
                diff <= 1e-4,
                "{name}, prompt {b}: {diff:e} from transformers"
            );
            alone_caches.push(alone_cache);
        }
        // Three cached steps, feeding each row its greedy tokens.
        for step in 0..3 {
            let next: Vec<i64> = want.greedy.iter().map(|g| g[step]).collect();
            let batched = tch::no_grad(|| {
                model.forward_cached(&Tensor::from_slice(&next).unsqueeze(1), &mut cache)
            })
            .unwrap()
            .logits;
            for (b, alone_cache) in alone_caches.iter_mut().enumerate() {
                let alone = tch::no_grad(|| {
                    model.forward_cached(&Tensor::from_slice(&[next[b]]).unsqueeze(0), alone_cache)
                })
                .unwrap()
                .logits;
                let diff = max_abs_diff(&batched.get(b as i64), &alone.get(0));
                assert!(diff < 1e-5, "{name}, prompt {b}, step {step}: {diff:e}");
            }
        }
        // Greedy generation of the whole batch.
        let options = GenerateOptions {
            max_new_tokens: 20,
            sampling: Sampling::greedy(),
            eos_token_ids: Vec::new(),
        };
        let rows =
            generate_batch(model, prompts, &options, |_, _| ControlFlow::Continue(())).unwrap();
        for (b, p) in prompts.iter().enumerate() {
            let alone = generate(model, p, 20, Sampling::greedy(), |_| {}).unwrap();
            assert_eq!(rows[b], alone, "{name}, prompt {b}: batched vs alone");
            assert_eq!(
                rows[b], want.greedy[b],
                "{name}, prompt {b}: vs transformers"
            );
        }
    }
}

/// A row that reaches an end token or whose callback breaks stops; the
/// others go on.
#[test]
fn rows_end_on_their_own() {
    let pretrained = load(&fixture("mixtral"));
    let want = expected("mixtral");
    let eos = want.greedy[1][3];
    let options = GenerateOptions {
        max_new_tokens: 20,
        sampling: Sampling::greedy(),
        eos_token_ids: vec![eos],
    };
    let mut seen = vec![0usize; 3];
    let rows = generate_batch(&pretrained.model, &want.prompts, &options, |row, _| {
        seen[row] += 1;
        if row == 2 && seen[row] == 5 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    let first_eos = |g: &[i64]| g.iter().position(|&t| t == eos).map_or(g.len(), |i| i + 1);
    assert_eq!(
        rows[1],
        want.greedy[1][..first_eos(&want.greedy[1])].to_vec()
    );
    assert_eq!(
        rows[0],
        want.greedy[0][..first_eos(&want.greedy[0])].to_vec()
    );
    assert_eq!(rows[2].len(), 5.min(first_eos(&want.greedy[2])));
    assert_eq!(seen, rows.iter().map(Vec::len).collect::<Vec<_>>());
}

#[test]
fn bad_batches_are_errors() {
    let pretrained = load(&fixture("llama"));
    let model = &pretrained.model;
    let options = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::greedy(),
        eos_token_ids: Vec::new(),
    };
    let go = |prompts: &[Vec<i64>], options: &GenerateOptions| {
        generate_batch(model, prompts, options, |_, _| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string()
    };
    assert!(go(&[], &options).contains("at least one prompt"));
    assert!(go(&[vec![1, 2], vec![]], &options).contains("prompt 1 is empty"));
    assert!(go(&[vec![1, 2], vec![500]], &options).contains("500"));
    let long = GenerateOptions {
        max_new_tokens: 60,
        ..options.clone()
    };
    let msg = go(&[vec![1; 5], vec![2; 9]], &long);
    assert!(
        msg.contains("need 68 positions") && msg.contains("context of 64"),
        "{msg}"
    );
    // The padding must match the batch.
    let mut cache = model.new_cache();
    cache
        .set_padding(&Tensor::from_slice(&[1i64, 1, 0, 1]).view([2, 2]))
        .unwrap();
    let err = model
        .forward_cached(&Tensor::from_slice(&[1i64, 2]).view([1, 2]), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch size 2"), "{err}");
    assert!(cache.set_padding(&Tensor::from_slice(&[1i64])).is_err());
}
