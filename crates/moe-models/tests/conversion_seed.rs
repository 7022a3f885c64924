//! A seeded LLaMA-MoE conversion draws the same gates every time (in name
//! order, not a hash map's: with six gates, two hash maps' orders agree
//! with probability 1/720), and its all-active check is rounding only.
//! One test in its own process: it reseeds libtorch's one generator.

use moe_models::{DecoderConfig, DecoderModel, DecoderPreset, ExpertConstruction, MoeConversion};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn a_seeded_conversion_is_the_same_every_time() {
    tch::manual_seed(5);
    let config = DecoderConfig {
        vocab_size: 40,
        hidden_size: 32,
        num_hidden_layers: 6,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..DecoderConfig::preset(DecoderPreset::Llama)
    };
    let dense_vs = nn::VarStore::new(Device::Cpu);
    let dense = DecoderModel::new(&dense_vs.root(), &config).unwrap();
    let conversion = MoeConversion {
        num_experts: 4,
        top_k: 2,
        construction: "split".parse::<ExpertConstruction>().unwrap(),
        gate_std: 0.02,
    };
    let converted = || {
        tch::manual_seed(9);
        let vs = nn::VarStore::new(Device::Cpu);
        conversion.convert(&dense_vs, &config, &vs).unwrap();
        vs
    };
    let (a, b) = (converted(), converted());
    let b = b.variables();
    for (name, value) in a.variables() {
        assert!(
            value.equal(&b[&name]),
            "{name} differs between two conversions"
        );
    }
    let probe = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
    let error = conversion
        .all_active_error(&dense, &dense_vs, &probe)
        .unwrap();
    // f32 sums of 4 experts' 16-neuron slices instead of one 64-neuron MLP.
    assert!(error < 1e-4, "all experts active: {error}");
    assert!("clustered".parse::<ExpertConstruction>().is_err());
}
