//! LLaMA-MoE's conversion of a dense decoder: with every expert active at
//! weight 1 the converted model computes the dense model's logits; upcycled
//! experts do so under any routing; bad conversions are errors.

use moe_experts::NeuronPartition;
use moe_models::{
    CausalLm, DecoderConfig, DecoderModel, DecoderPreset, ExpertConstruction, MoeConversion,
};
use tch::{nn, Device, Tensor};

fn dense() -> (nn::VarStore, DecoderConfig, DecoderModel) {
    tch::manual_seed(5);
    let config = DecoderConfig {
        vocab_size: 40,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..DecoderConfig::preset(DecoderPreset::Llama)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DecoderModel::new(&vs.root(), &config).unwrap();
    (vs, config, model)
}

fn max_logit_diff(a: &dyn CausalLm, b: &dyn CausalLm) -> f64 {
    let idx = Tensor::from_slice(&[3i64, 17, 9, 30, 1, 22, 8, 8, 39, 0]).view([2, 5]);
    let la = a.forward_t(&idx, false).unwrap().logits;
    let lb = b.forward_t(&idx, false).unwrap().logits;
    (la - lb).abs().max().double_value(&[])
}

#[test]
fn split_experts_all_active_at_weight_one_give_the_dense_logits() {
    let (dense_vs, config, dense) = dense();
    for partition in [
        NeuronPartition::Random { seed: 3 },
        NeuronPartition::BalancedKMeans {
            iterations: 5,
            seed: 1,
        },
    ] {
        let conversion = MoeConversion {
            num_experts: 4,
            top_k: 4,
            construction: ExpertConstruction::Split { partition },
            gate_std: 0.0,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let moe = conversion.convert(&dense_vs, &config, &vs).unwrap();
        assert_eq!(moe.config().moe_intermediate_size, Some(16));
        assert_eq!(moe.num_moe_layers(), 2);
        let diff = max_logit_diff(&dense, &moe);
        assert!(diff < 1e-4, "{partition:?}: logits differ by {diff}");
        // Top-2 routing is a different (sparser) function.
        let sparse = MoeConversion {
            top_k: 2,
            gate_std: 0.02,
            ..conversion
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let moe = sparse.convert(&dense_vs, &config, &vs).unwrap();
        assert!(max_logit_diff(&dense, &moe) > 1e-3);
    }
}

#[test]
fn upcycled_experts_give_the_dense_logits_under_any_routing() {
    let (dense_vs, config, dense) = dense();
    let conversion = MoeConversion {
        num_experts: 4,
        top_k: 2,
        construction: ExpertConstruction::Upcycle,
        gate_std: 0.5,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let moe = conversion.convert(&dense_vs, &config, &vs).unwrap();
    let diff = max_logit_diff(&dense, &moe);
    assert!(diff < 1e-4, "logits differ by {diff}");
    // The gates are new and random, the rest copied.
    let vars = vs.variables();
    let gate = &vars["model.layers.0.mlp.router.gate.weight"];
    assert!(gate.std(true).double_value(&[]) > 0.1);
    let dense_vars = dense_vs.variables();
    assert!(vars["model.embed_tokens.weight"].equal(&dense_vars["model.embed_tokens.weight"]));
    let q = "model.layers.1.self_attn.q_proj.weight";
    assert!(vars[q].equal(&dense_vars[q]));
    assert_eq!(
        vars["model.layers.1.mlp.experts.w_gate"].size(),
        vec![4, 32, 64]
    );
}

#[test]
fn bad_conversions_are_errors() {
    let (dense_vs, config, _) = dense();
    let split = ExpertConstruction::Split {
        partition: NeuronPartition::default(),
    };
    let cases = [
        (
            MoeConversion {
                num_experts: 5,
                top_k: 2,
                construction: split,
                gate_std: 0.0,
            },
            "divisor",
        ),
        (
            MoeConversion {
                num_experts: 4,
                top_k: 5,
                construction: split,
                gate_std: 0.0,
            },
            "top_k",
        ),
        (
            MoeConversion {
                num_experts: 4,
                top_k: 2,
                construction: split,
                gate_std: -1.0,
            },
            "gate_std",
        ),
    ];
    for (conversion, needle) in cases {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = conversion
            .convert(&dense_vs, &config, &vs)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Only a dense model converts.
    let moe_config = DecoderConfig::preset(DecoderPreset::Mixtral);
    let ok = MoeConversion {
        num_experts: 4,
        top_k: 2,
        construction: ExpertConstruction::Upcycle,
        gate_std: 0.0,
    };
    let err = ok.moe_config(&moe_config).unwrap_err().to_string();
    assert!(err.contains("must be dense"), "{err}");
}
