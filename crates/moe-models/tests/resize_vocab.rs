//! A larger vocabulary for a decoder: old ids give the old logits, new rows
//! are the mean of the old ones, everything else is copied, and bad sizes
//! are errors. No test seeds libtorch's generator: the properties hold for
//! any draw.

mod support;

use moe_core::MoeError;
use moe_models::{resize_vocab, CausalLm, DecoderConfig, DecoderModel, DecoderPreset};
use tch::{nn, Device, Kind, Tensor};

const OLD: i64 = 30;
const NEW: i64 = 47;

/// A preset on small sizes; embeddings scaled up so logits are far from 0.
fn model(preset: DecoderPreset, tied: bool) -> (nn::VarStore, DecoderConfig, DecoderModel) {
    let config = DecoderConfig {
        tie_word_embeddings: tied,
        ..support::small_decoder(preset, OLD)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), &config).unwrap();
    tch::no_grad(|| {
        let mut embed = vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = embed.g_mul_scalar_(50.0);
    });
    (vs, config, model)
}

/// The width of the head's dot products (`hidden_size` of `small_decoder`).
const D: f64 = 32.0;

/// How far two f32 evaluations of logits like `logits` may differ when only
/// the order of `terms` summed products differs (the head's matrix has
/// other rows, so BLAS may block the same dot products otherwise): at most
/// `2 gamma_n` of the sum of the terms' magnitudes, `gamma_n ~ n u`, `u =
/// 2^-24` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1),
/// with that sum taken as at most 8 times the largest |logit|.
fn rounding_bound(terms: f64, logits: &Tensor) -> f64 {
    const F32_U: f64 = 5.960_464_477_539_063e-8;
    2.0 * terms * F32_U * 8.0 * logits.abs().max().double_value(&[])
}

fn old_ids() -> Tensor {
    Tensor::from_slice(&[3i64, 17, 9, 29, 1, 22, 8, 8, 0, 12, 5, 28]).view([2, 6])
}

fn logits(model: &DecoderModel, idx: &Tensor) -> Tensor {
    model.forward_t(idx, false).unwrap().logits
}

#[test]
fn old_ids_give_the_old_logits_and_new_rows_are_the_mean() {
    for (preset, tied) in [
        (DecoderPreset::Mixtral, false),
        (DecoderPreset::DeepseekV3, false),
        (DecoderPreset::Llama, true),
    ] {
        let (old_vs, config, old) = model(preset, tied);
        let vs = nn::VarStore::new(Device::Cpu);
        let new = resize_vocab(&old_vs, &config, NEW, &vs).unwrap();
        assert_eq!(new.config().vocab_size, NEW);
        assert_eq!(new.vocab_size(), NEW);
        assert_eq!(
            DecoderConfig {
                vocab_size: OLD,
                ..new.config().clone()
            },
            config
        );

        // Logits of the old vocabulary: the old ones, up to the order of
        // the head's sums.
        let idx = old_ids();
        let (a, b) = (logits(&old, &idx), logits(&new, &idx));
        assert_eq!(b.size(), [2, 6, NEW]);
        let diff = (b.narrow(2, 0, OLD) - &a).abs().max().double_value(&[]);
        let bound = rounding_bound(D, &a);
        assert!(
            diff <= bound,
            "{preset:?}: old logits differ by {diff} > {bound}"
        );
        assert!(
            a.abs().max().double_value(&[]) > 0.1,
            "{preset:?}: logits too small to tell"
        );

        // Vocabulary matrices: old rows kept, new rows the mean.
        let before = old_vs.variables();
        let after = vs.variables();
        let matrices: &[&str] = if tied {
            assert!(!after.contains_key("lm_head.weight"));
            &["model.embed_tokens.weight"]
        } else {
            &["model.embed_tokens.weight", "lm_head.weight"]
        };
        for name in matrices {
            let (w, w2) = (&before[*name], &after[*name]);
            assert_eq!(w2.size(), [NEW, 32]);
            assert!(w2.narrow(0, 0, OLD).equal(w), "{preset:?} {name}: old rows");
            let mean = w.mean_dim(0, true, Kind::Float);
            let new_rows = w2.narrow(0, OLD, NEW - OLD);
            let diff = (new_rows - &mean).abs().max().double_value(&[]);
            assert!(
                diff == 0.0,
                "{preset:?} {name}: new rows are off the mean by {diff}"
            );
        }
        // Everything else copied bit for bit.
        assert_eq!(before.len(), after.len());
        for (name, w) in &before {
            if !matrices.contains(&name.as_str()) {
                assert!(after[name].equal(w), "{preset:?}: {name} differs");
            }
        }

        // A new token's logit is the mean of the old ones; together the new
        // tokens get at most k / (V + k) of the probability (Jensen).
        let new_logits = b.narrow(2, OLD, NEW - OLD);
        let mean = a.mean_dim(2, true, Kind::Float);
        let diff = (&new_logits - mean).abs().max().double_value(&[]);
        // h . mean(w) against mean(h . w): the d products and the mean over
        // the OLD logits, summed in other orders.
        let bound = rounding_bound(D + OLD as f64, &a);
        assert!(
            diff <= bound,
            "{preset:?}: new logits off the mean logit by {diff} > {bound}"
        );
        let mass = b
            .softmax(2, Kind::Float)
            .narrow(2, OLD, NEW - OLD)
            .sum_dim_intlist(2, false, Kind::Float);
        let bound = (NEW - OLD) as f64 / NEW as f64;
        let max_mass = mass.max().double_value(&[]);
        assert!(
            max_mass <= bound + 1e-6,
            "{preset:?}: new tokens take {max_mass} > {bound}"
        );

        // New ids run through the model.
        let idx = Tensor::from_slice(&[OLD, NEW - 1, 4]).view([1, 3]);
        assert_eq!(logits(&new, &idx).size(), [1, 3, NEW]);
    }
}

#[test]
fn sizes_that_do_not_grow_and_mismatched_stores_are_errors() {
    let (old_vs, config, _old) = model(DecoderPreset::Mixtral, false);
    for size in [OLD, OLD - 1, 0] {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = resize_vocab(&old_vs, &config, size, &vs).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("larger than the model's {OLD}")),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("got {size}")), "{err}");
    }
    // A store that is not this config's model.
    let wrong = DecoderConfig {
        vocab_size: OLD + 1,
        ..config.clone()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let err = resize_vocab(&old_vs, &wrong, NEW, &vs).unwrap_err();
    assert!(matches!(err, MoeError::Shape { .. }), "{err}");
    assert!(
        err.to_string().contains("embed_tokens") || err.to_string().contains("lm_head"),
        "{err}"
    );
    let empty = nn::VarStore::new(Device::Cpu);
    let vs = nn::VarStore::new(Device::Cpu);
    let err = resize_vocab(&empty, &config, NEW, &vs).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert!(err.to_string().contains("has no variable"), "{err}");
}
