//! LLaMA-MoE's expert construction and upcycling against the dense FFN.

use moe_core::MoeError;
use moe_experts::{
    partition_neurons, split_dense_ffn, upcycle_dense_ffn, Activation, DenseFfnWeights, ExpertBank,
    ExpertConfig, NeuronPartition,
};
use tch::{nn, Device, Kind, Tensor};

fn dense(d: i64, h: i64, swiglu: bool) -> DenseFfnWeights {
    dense_with_bias(d, h, swiglu, true)
}

fn dense_with_bias(d: i64, h: i64, swiglu: bool, bias: bool) -> DenseFfnWeights {
    let r = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    DenseFfnWeights {
        w_in: r(&[d, h]),
        b_in: bias.then(|| r(&[h])),
        w_gate: swiglu.then(|| r(&[d, h])),
        b_gate: (swiglu && bias).then(|| r(&[h])),
        w_out: r(&[h, d]),
        b_out: bias.then(|| r(&[d])),
    }
}

fn bank(vs: &nn::VarStore, e: i64, d: i64, h: i64, activation: Activation) -> ExpertBank {
    bank_with_bias(vs, e, d, h, activation, true)
}

fn bank_with_bias(
    vs: &nn::VarStore,
    e: i64,
    d: i64,
    h: i64,
    activation: Activation,
    bias: bool,
) -> ExpertBank {
    let config = ExpertConfig {
        num_experts: e,
        input_dim: d,
        hidden_dim: h,
        dropout: 0.0,
        activation,
        bias,
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
        b_in: None,
        w_gate: None,
        b_gate: None,
        w_out: Tensor::zeros([h, d], (Kind::Float, Device::Cpu)),
        b_out: None,
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

#[test]
fn banks_without_bias_have_no_bias_variables_and_split_from_a_bias_free_ffn() {
    tch::manual_seed(4);
    let (d, h, e) = (6, 24, 4);
    for activation in [Activation::Relu, Activation::SwiGlu] {
        let swiglu = activation == Activation::SwiGlu;
        let vs = nn::VarStore::new(Device::Cpu);
        let mut experts = bank_with_bias(&vs, e, d, h / e, activation, false);
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(
            names.iter().all(|n| n != "b_in" && n != "b_out"),
            "{names:?}"
        );
        assert!(experts.b_in.is_none() && experts.b_out.is_none());
        let counted: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(counted, e * experts.config().params_per_expert());
        assert_eq!(
            experts.config().params_per_expert(),
            (2 + i64::from(swiglu)) * d * (h / e)
        );

        // LLaMA-style FFN without biases: the split experts still sum to it,
        // through every way the bank computes.
        let dense = dense_with_bias(d, h, swiglu, false);
        experts
            .load(&split_dense_ffn(&dense, e, NeuronPartition::Random { seed: 1 }).unwrap())
            .unwrap();
        let x = Tensor::randn([9, d], (Kind::Float, Device::Cpu));
        let want = dense.forward(&x);
        let all = experts
            .forward_all(&x, false)
            .sum_dim_intlist(0, false, None);
        assert!(max_diff(&all, &want) < 1e-4);
        let views = experts.views(&x);
        let looped = (0..e)
            .map(|i| experts.ffn_view(&views, i as usize, &x) - experts.ffn(i, &x))
            .map(|diff| diff.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(looped < 1e-5, "ffn_view vs ffn: {looped}");

        // Upcycled: every expert equals the bias-free FFN.
        experts
            .load(&upcycle_dense_ffn(&dense_with_bias(d, h / e, swiglu, false), e).unwrap())
            .unwrap();
        // Weights with biases do not fit a bank without them.
        let biased = upcycle_dense_ffn(&dense_with_bias(d, h / e, swiglu, true), e).unwrap();
        let err = experts.load(&biased).unwrap_err();
        assert!(matches!(err, MoeError::Config(_)));
        assert!(err.to_string().contains("b_in"), "{err}");
    }
    // And the other way round.
    let vs = nn::VarStore::new(Device::Cpu);
    let mut with_bias = bank(&vs, 2, 4, 3, Activation::Relu);
    let bare = upcycle_dense_ffn(&dense_with_bias(4, 3, false, false), 2).unwrap();
    assert!(matches!(with_bias.load(&bare), Err(MoeError::Config(_))));
}
