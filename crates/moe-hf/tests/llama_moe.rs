//! LLaMA-MoE's conversion of transformers' dense Llama checkpoint: with every
//! expert active at weight 1 (split neurons) or under any routing
//! (upcycled copies), the MoE model computes the logits transformers
//! computes for the dense model; the upcycled model is a Mixtral checkpoint
//! that loads back to the same logits.

mod common;

use common::{expected, fixture, load, max_abs_diff, temp_dir};
use moe_experts::NeuronPartition;
use moe_hf::save_pretrained;
use moe_models::{CausalLm, DecoderModel, ExpertConstruction, MoeConversion};
use tch::{nn, Tensor};

/// The largest difference between `model`'s logits on the fixture's
/// prompts and transformers' logits of the dense Llama.
fn diff_to_transformers(model: &DecoderModel) -> f64 {
    let want = expected("llama");
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
    worst
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
            let diff = diff_to_transformers(&moe);
            println!("split ({partition:?}), {num_experts} of {num_experts} experts: {diff:e}");
            assert!(
                diff <= 1e-4,
                "{partition:?}, {num_experts} experts: {diff:e} from transformers' dense logits"
            );
            // Top-2 of them is another, sparser function.
            let sparse = MoeConversion {
                top_k: 2,
                gate_std: 0.02,
                ..conversion
            };
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let moe = sparse.convert(&dense.vs, &dense.config, &vs).unwrap();
            assert!(diff_to_transformers(&moe) > 1e-3);
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
    let diff = diff_to_transformers(&moe);
    println!("upcycled, top-2 of 4 experts: {diff:e}");
    assert!(
        diff <= 1e-4,
        "upcycled: {diff:e} from transformers' dense logits"
    );
    // Softmax top-k, renormalised, no scaling: Mixtral expresses it.
    let dir = temp_dir("llama-moe-mixtral");
    save_pretrained(&moe, &vs, "mixtral", &dir, dense.tokenizer.as_ref()).unwrap();
    let back = load(&dir);
    assert_eq!(back.family().model_type(), "mixtral");
    assert_eq!(back.config.num_local_experts, 4);
    assert_eq!(diff_to_transformers(&back.model), diff);
    std::fs::remove_dir_all(&dir).unwrap();
}
