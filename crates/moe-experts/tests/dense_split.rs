//! LLaMA-MoE's expert construction and upcycling against the dense FFN.

use moe_core::MoeError;
use moe_experts::{
    partition_neurons, split_dense_ffn, upcycle_dense_ffn, Activation, DenseFfnWeights, ExpertBank,
    ExpertConfig, NeuronPartition,
};
use tch::{nn, Device, Kind, Tensor};

fn dense(d: i64, h: i64, swiglu: bool) -> DenseFfnWeights {
    let r = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    DenseFfnWeights {
        w_in: r(&[d, h]),
        b_in: r(&[h]),
        w_gate: swiglu.then(|| r(&[d, h])),
        w_out: r(&[h, d]),
        b_out: r(&[d]),
    }
}

fn bank(vs: &nn::VarStore, e: i64, d: i64, h: i64, activation: Activation) -> ExpertBank {
    let config = ExpertConfig {
        num_experts: e,
        input_dim: d,
        hidden_dim: h,
        dropout: 0.0,
        activation,
        ..Default::default()
    };
    ExpertBank::new(&vs.root(), &config).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn split_experts_sum_to_the_dense_ffn() {
    tch::manual_seed(0);
    let (d, h, e) = (6, 24, 4);
    for swiglu in [false, true] {
        let dense = dense(d, h, swiglu);
        let x = Tensor::randn([10, d], (Kind::Float, Device::Cpu));
        let want = dense.forward(&x);
        for partition in [
            NeuronPartition::Random { seed: 3 },
            NeuronPartition::BalancedKMeans {
                iterations: 5,
                seed: 3,
            },
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut experts = bank(&vs, e, d, h / e, dense.activation());
            experts
                .load(&split_dense_ffn(&dense, e, partition).unwrap())
                .unwrap();
            // Every expert active with weight 1.
            let got = experts
                .forward_all(&x, false)
                .sum_dim_intlist(0, false, None);
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-4, "{partition:?} swiglu={swiglu}: {diff}");
        }
    }
}

#[test]
fn partitions_are_equal_disjoint_and_complete() {
    tch::manual_seed(1);
    let dense = dense(5, 32, true);
    for partition in [
        NeuronPartition::Random { seed: 7 },
        NeuronPartition::BalancedKMeans {
            iterations: 4,
            seed: 7,
        },
    ] {
        let sets = partition_neurons(&dense, 4, partition).unwrap();
        assert_eq!(sets.len(), 4);
        assert!(sets.iter().all(|s| s.len() == 8), "{sets:?}");
        let mut all: Vec<i64> = sets.concat();
        all.sort_unstable();
        assert_eq!(all, (0..32).collect::<Vec<_>>());
    }
}

#[test]
fn balanced_kmeans_recovers_planted_clusters() {
    tch::manual_seed(2);
    // 4 well-separated directions in R^8; neuron j belongs to cluster owner[j].
    let (d, h, e) = (8i64, 20i64, 4i64);
    let owner: Vec<i64> = (0..h).map(|j| (j * 7 + 3) % e).collect();
    let centres = Tensor::randn([e, d], (Kind::Float, Device::Cpu)) * 5.0;
    let noise = Tensor::randn([h, d], (Kind::Float, Device::Cpu)) * 0.1;
    let rows = centres.index_select(0, &Tensor::from_slice(&owner)) + noise; // [h, d]
    let dense = DenseFfnWeights {
        w_in: rows.transpose(0, 1).contiguous(),
        b_in: Tensor::zeros([h], (Kind::Float, Device::Cpu)),
        w_gate: None,
        w_out: Tensor::zeros([h, d], (Kind::Float, Device::Cpu)),
        b_out: Tensor::zeros([d], (Kind::Float, Device::Cpu)),
    };
    let partition = NeuronPartition::BalancedKMeans {
        iterations: 10,
        seed: 0,
    };
    let sets = partition_neurons(&dense, e, partition).unwrap();
    for set in &sets {
        let first = owner[set[0] as usize];
        assert!(
            set.iter().all(|&j| owner[j as usize] == first),
            "a cluster mixes planted groups: {sets:?}"
        );
    }
}

#[test]
fn upcycled_experts_each_equal_the_dense_ffn() {
    tch::manual_seed(3);
    let (d, h, e) = (4, 12, 3);
    let dense = dense(d, h, false);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut experts = bank(&vs, e, d, h, Activation::Relu);
    experts
        .load(&upcycle_dense_ffn(&dense, e).unwrap())
        .unwrap();
    let x = Tensor::randn([7, d], (Kind::Float, Device::Cpu));
    let want = dense.forward(&x);
    for i in 0..e {
        assert!(max_diff(&experts.forward_expert(i, &x, false), &want) < 1e-5);
    }
}

#[test]
fn bad_splits_and_loads_are_errors() {
    let dense = dense(4, 10, false);
    let err = split_dense_ffn(&dense, 4, NeuronPartition::default()).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)));
    assert!(err.to_string().contains("divide"), "{err}");
    assert!(upcycle_dense_ffn(&dense, 0).is_err());
    // Weights of the wrong hidden size, or with a gate the bank lacks.
    let vs = nn::VarStore::new(Device::Cpu);
    let mut experts = bank(&vs, 2, 4, 3, Activation::Relu);
    let split = split_dense_ffn(&dense, 2, NeuronPartition::default()).unwrap();
    assert!(matches!(experts.load(&split), Err(MoeError::Shape { .. })));
    let gated = upcycle_dense_ffn(&self::dense(4, 3, true), 2).unwrap();
    assert!(matches!(experts.load(&gated), Err(MoeError::Config(_))));
}
