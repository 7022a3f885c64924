use crate::{BankWeights, DenseFfnWeights};
use moe_core::{MoeError, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554, §2.2) partitions the
/// `h` hidden neurons of a dense FFN into `E` equal sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NeuronPartition {
    /// A random permutation cut into `E` slices ("random split").
    Random {
        /// Seed of the permutation.
        seed: u64,
    },
    /// Balanced k-means ("clustering split"): neurons are clustered by their
    /// L2-normalised input weights (the column of `w_in`, with the column of
    /// `w_gate` appended for SwiGLU) into `E` clusters of exactly `h / E`,
    /// by cosine similarity to the centroids, assigned greedily from the most
    /// similar (neuron, centroid) pair down.
    BalancedKMeans {
        /// Rounds of assignment and centroid update.
        iterations: usize,
        /// Seed of the initial centroids.
        seed: u64,
    },
}

impl Default for NeuronPartition {
    fn default() -> Self {
        NeuronPartition::Random { seed: 0 }
    }
}

/// Builds `E` experts from a dense FFN by splitting its hidden neurons
/// (LLaMA-MoE, arXiv 2406.16554, eq. 3-5): with `S_e` the `e`-th neuron set,
///
/// `w_in[e] = W_in[:, S_e]`, `b_in[e] = b_in[S_e]`, `w_gate[e] = W_gate[:, S_e]`,
/// `b_gate[e] = b_gate[S_e]`,
/// `w_out[e] = W_out[S_e, :]`, `b_out[e] = b_out / E`.
///
/// Hidden neurons act independently, so `sum_e FFN_e(x) = FFN(x)` exactly
/// when every expert is active with weight 1. The output bias is shared
/// equally (`b_out / E` each) rather than given to one expert: experts stay
/// interchangeable, and the sum still counts `b_out` once. (LLaMA has no
/// biases, so the paper does not face this choice.) An FFN without biases
/// gives experts without biases.
pub fn split_dense_ffn(
    dense: &DenseFfnWeights,
    num_experts: i64,
    partition: NeuronPartition,
) -> Result<BankWeights> {
    let sets = partition_neurons(dense, num_experts, partition)?;
    let device = dense.w_in.device();
    let index: Vec<Tensor> = sets
        .iter()
        .map(|s| Tensor::from_slice(s).to_device(device))
        .collect();
    let stack = |pick: &dyn Fn(&Tensor) -> Tensor| -> Tensor {
        Tensor::stack(&index.iter().map(pick).collect::<Vec<_>>(), 0)
    };
    Ok(BankWeights {
        w_in: stack(&|s| dense.w_in.index_select(1, s)),
        b_in: dense
            .b_in
            .as_ref()
            .map(|b| stack(&|s| b.index_select(0, s))),
        w_gate: dense
            .w_gate
            .as_ref()
            .map(|g| stack(&|s| g.index_select(1, s))),
        b_gate: dense
            .b_gate
            .as_ref()
            .map(|b| stack(&|s| b.index_select(0, s))),
        w_out: stack(&|s| dense.w_out.index_select(0, s)),
        b_out: dense.b_out.as_ref().map(|b| {
            (b / num_experts as f64)
                .unsqueeze(0)
                .repeat([num_experts, 1])
        }),
    })
}

/// Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every one
/// of the `E` experts starts as a copy of the dense FFN, `FFN_e = FFN`, so a
/// top-k layer whose weights sum to 1 starts out computing the dense FFN.
/// Biases are copied where the dense FFN has them.
pub fn upcycle_dense_ffn(dense: &DenseFfnWeights, num_experts: i64) -> Result<BankWeights> {
    dense.dims()?;
    check_num_experts(num_experts)?;
    let copies = |t: &Tensor| {
        let mut reps = vec![num_experts];
        reps.extend(std::iter::repeat_n(1, t.dim()));
        t.unsqueeze(0).repeat(reps.as_slice())
    };
    Ok(BankWeights {
        w_in: copies(&dense.w_in),
        b_in: dense.b_in.as_ref().map(copies),
        w_gate: dense.w_gate.as_ref().map(copies),
        b_gate: dense.b_gate.as_ref().map(copies),
        w_out: copies(&dense.w_out),
        b_out: dense.b_out.as_ref().map(copies),
    })
}

fn check_num_experts(num_experts: i64) -> Result<()> {
    if num_experts < 1 {
        return Err(MoeError::config(format!(
            "num_experts must be at least 1, got {num_experts}"
        )));
    }
    Ok(())
}

/// The `E` neuron sets, each of `h / E` sorted neuron indices.
pub fn partition_neurons(
    dense: &DenseFfnWeights,
    num_experts: i64,
    partition: NeuronPartition,
) -> Result<Vec<Vec<i64>>> {
    let (_, h) = dense.dims()?;
    check_num_experts(num_experts)?;
    if h % num_experts != 0 {
        return Err(MoeError::config(format!(
            "cannot split {h} hidden neurons into {num_experts} equal experts: \
             num_experts must divide the hidden size"
        )));
    }
    let size = (h / num_experts) as usize;
    let mut sets = match partition {
        NeuronPartition::Random { seed } => {
            let order = permutation(h as usize, seed);
            order.chunks(size).map(|c| c.to_vec()).collect::<Vec<_>>()
        }
        NeuronPartition::BalancedKMeans { iterations, seed } => {
            let features = neuron_features(dense)?;
            balanced_kmeans(&features, num_experts as usize, iterations.max(1), seed)
        }
    };
    for s in &mut sets {
        s.sort_unstable();
    }
    Ok(sets)
}

/// One L2-normalised row per hidden neuron: its input weights.
fn neuron_features(dense: &DenseFfnWeights) -> Result<Vec<Vec<f32>>> {
    let mut cols = dense.w_in.transpose(0, 1).to_kind(Kind::Float); // [h, d]
    if let Some(g) = &dense.w_gate {
        cols = Tensor::cat(&[cols, g.transpose(0, 1).to_kind(Kind::Float)], 1);
    }
    let norm = cols.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    let rows = (cols / norm).to_device(tch::Device::Cpu);
    Ok(Vec::<Vec<f32>>::try_from(rows)?)
}

/// k-means with exactly `n / k` points per cluster, on unit vectors, by cosine similarity.
fn balanced_kmeans(points: &[Vec<f32>], k: usize, iterations: usize, seed: u64) -> Vec<Vec<i64>> {
    let n = points.len();
    let size = n / k;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut centroids: Vec<Vec<f32>> = permutation(n, seed)[..k]
        .iter()
        .map(|&i| points[i as usize].clone())
        .collect();
    let mut clusters = vec![Vec::new(); k];
    for _ in 0..iterations {
        // Greedy balanced assignment: most similar pairs first, clusters capped at `size`.
        let mut pairs: Vec<(f32, usize, usize)> = (0..n)
            .flat_map(|i| (0..k).map(move |c| (i, c)))
            .map(|(i, c)| (dot(&points[i], &centroids[c]), i, c))
            .collect();
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut assigned = vec![false; n];
        clusters = vec![Vec::with_capacity(size); k];
        for (_, i, c) in pairs {
            if !assigned[i] && clusters[c].len() < size {
                assigned[i] = true;
                clusters[c].push(i as i64);
            }
        }
        for (c, members) in clusters.iter().enumerate() {
            let mut mean = vec![0f32; points[0].len()];
            for &i in members {
                mean.iter_mut()
                    .zip(&points[i as usize])
                    .for_each(|(m, p)| *m += p);
            }
            let norm = dot(&mean, &mean).sqrt().max(1e-12);
            centroids[c] = mean.iter().map(|m| m / norm).collect();
        }
    }
    clusters
}

/// A permutation of `0..n` from a seeded SplitMix64 Fisher-Yates shuffle,
/// independent of libtorch's global generator.
fn permutation(n: usize, seed: u64) -> Vec<i64> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
