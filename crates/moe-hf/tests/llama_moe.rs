//! LLaMA-MoE's conversion of transformers' dense Llama checkpoint: with every
//! expert active at weight 1 (split neurons) or under any routing
//! (upcycled copies), the MoE model computes the logits transformers
//! computes for the dense model; the upcycled model is a Mixtral checkpoint
//! that loads back to the same logits.

mod common;

use common::{expected, fixture, load, logit_tolerance, max_abs_diff, temp_dir};
use moe_experts::NeuronPartition;
use moe_hf::save_pretrained;
use moe_models::{CausalLm, DecoderModel, ExpertConstruction, MoeConversion};
use tch::{nn, Tensor};

/// The largest difference between `model`'s logits on the fixture's
/// prompts and transformers' logits of the dense Llama, and the bound of
/// f32 arithmetic on it ([`common::logit_tolerance`]).
fn diff_to_transformers(model: &DecoderModel, vs: &nn::VarStore) -> (f64, f64) {
    let want = expected("llama");
    let longest = want.prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let tolerance = logit_tolerance(model.config(), vs, longest);
    let mut worst = 0.0f64;
    for (p, prompt) in want.prompts.iter().enumerate() {
        let logits =
            tch::no_grad(|| model.forward_t(&Tensor::from_slice(prompt).unsqueeze(0), false))
                .unwrap()
                .logits
                .squeeze_dim(0);
        let theirs = Tensor::from_slice(&want.logits[p].concat()).view([prompt.len() as i64, -1]);
        worst = worst.max(max_abs_diff(&logits, &theirs));
    }
    (worst, tolerance)
}

#[test]
fn split_llama_with_every_expert_active_computes_transformers_dense_logits() {
    let dense = load(&fixture("llama"));
    assert_eq!(dense.config.num_local_experts, 0);
    for partition in [
        NeuronPartition::Random { seed: 3 },
        NeuronPartition::BalancedKMeans {
            iterations: 5,
            seed: 1,
        },
    ] {
        for num_experts in [4, 8] {
            let conversion = MoeConversion {
                num_experts,
                top_k: num_experts,
                construction: ExpertConstruction::Split { partition },
                gate_std: 0.0,
            };
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let moe = conversion.convert(&dense.vs, &dense.config, &vs).unwrap();
            assert_eq!(moe.num_moe_layers(), 2);
            assert_eq!(
                moe.config().expert_width() * num_experts,
                dense.config.intermediate_size
            );
            let (diff, tolerance) = diff_to_transformers(&moe, &vs);
            println!("split ({partition:?}), {num_experts} of {num_experts} experts: {diff:e}");
            assert!(
                diff <= tolerance,
                "{partition:?}, {num_experts} experts: {diff:e} from transformers' dense logits \
                 (> {tolerance:e})"
            );
            // Top-2 of them is another, sparser function.
            let sparse = MoeConversion {
                top_k: 2,
                gate_std: 0.02,
                ..conversion
            };
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let moe = sparse.convert(&dense.vs, &dense.config, &vs).unwrap();
            let (diff, tolerance) = diff_to_transformers(&moe, &vs);
            assert!(diff > 10.0 * tolerance, "top-2: {diff:e}");
        }
    }
}

#[test]
fn upcycled_llama_is_a_mixtral_checkpoint_with_the_dense_logits() {
    let dense = load(&fixture("llama"));
    let conversion = MoeConversion {
        num_experts: 4,
        top_k: 2,
        construction: ExpertConstruction::Upcycle,
        gate_std: 0.5,
    };
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let moe = conversion.convert(&dense.vs, &dense.config, &vs).unwrap();
    let (diff, tolerance) = diff_to_transformers(&moe, &vs);
    println!("upcycled, top-2 of 4 experts: {diff:e}");
    assert!(
        diff <= tolerance,
        "upcycled: {diff:e} from transformers' dense logits (> {tolerance:e})"
    );
    // Softmax top-k, renormalised, no scaling: Mixtral expresses it.
    let dir = temp_dir("llama-moe-mixtral");
    save_pretrained(&moe, &vs, "mixtral", &dir, dense.tokenizer.as_ref()).unwrap();
    let back = load(&dir);
    assert_eq!(back.family().model_type(), "mixtral");
    assert_eq!(back.config.num_local_experts, 4);
    assert_eq!(diff_to_transformers(&back.model, &back.vs).0, diff);
    std::fs::remove_dir_all(&dir).unwrap();
}
