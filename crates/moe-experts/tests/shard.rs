//! An expert-parallel rank's share of a bank ([`ExpertBank::new_shard`]):
//! the rows of the whole bank one process draws with the same seed, with
//! the generator left where the whole bank leaves it.

use moe_experts::{Activation, ExpertBank, ExpertConfig};
use tch::{nn, Device, Kind, Tensor};

fn config(activation: Activation) -> ExpertConfig {
    ExpertConfig {
        num_experts: 4,
        input_dim: 8,
        hidden_dim: 6,
        activation,
        bias: true,
        ..Default::default()
    }
}

/// The bank's tensors by name, and the next number the generator draws.
fn drawn(seed: i64, build: impl FnOnce(&nn::Path) -> ExpertBank) -> (Vec<Tensor>, f64) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let bank = build(&vs.root());
    let tensors = bank
        .tensors()
        .into_iter()
        .map(|t| t.detach().copy())
        .collect();
    (
        tensors,
        Tensor::randn([1], (Kind::Float, Device::Cpu)).double_value(&[0]),
    )
}

#[test]
fn a_shard_is_the_rows_of_the_whole_bank_and_draws_as_it_does() {
    for activation in [Activation::Relu, Activation::SwiGlu] {
        let c = config(activation);
        let (whole, next) = drawn(7, |p| ExpertBank::new(p, &c).unwrap());
        for experts in [0..2, 2..4, 1..4, 3..4] {
            let (shard, shard_next) = drawn(7, |p| {
                let bank = ExpertBank::new_shard(p, &c, experts.clone()).unwrap();
                assert_eq!(bank.num_experts(), experts.end - experts.start);
                bank
            });
            assert_eq!(shard.len(), whole.len());
            for (s, w) in shard.iter().zip(&whole) {
                let rows = w.narrow(0, experts.start, experts.end - experts.start);
                assert!(s.equal(&rows), "{activation:?} {experts:?}");
            }
            assert_eq!(
                shard_next, next,
                "the generator moves on as for the whole bank"
            );
        }
    }
}

#[test]
fn a_shard_outside_the_bank_is_an_error() {
    let c = config(Activation::Relu);
    let vs = nn::VarStore::new(Device::Cpu);
    for experts in [0..0, 3..5, -1..2] {
        let err = ExpertBank::new_shard(&vs.root(), &c, experts.clone()).unwrap_err();
        assert!(err.to_string().contains("0..4"), "{experts:?}: {err}");
    }
}
