//! Expert feed-forward networks of `moe-layers`.
//!
//! The `E` experts of a layer live in one [`ExpertBank`]: each weight is a
//! stacked tensor with the expert as leading dimension, so that one expert
//! is a view (`w_in[e]`), all experts are one batched matmul, and grouped
//! GEMM kernels can read the bank without copies. A bank can be built from
//! a dense FFN ([`split_dense_ffn`], LLaMA-MoE; [`upcycle_dense_ffn`]),
//! and quantised to int8 for inference ([`ExpertBank::quantize`],
//! [`ExpertQuantization`]).
#![warn(missing_docs)]

mod bank;
mod config;
mod dense_split;
mod quantize;
mod residency;
mod weights;

pub use bank::{plus_bias, ExpertBank, ExpertViews, Int8Experts, MappedExperts};
pub use config::{Activation, ExpertConfig};
pub use dense_split::{partition_neurons, split_dense_ffn, upcycle_dense_ffn, NeuronPartition};
pub use quantize::{
    int8_matmul, pack_mm_supported, ExpertQuantization, Int8Kernel, Int8Weight, PACK_MM_K_MULTIPLE,
    ZERO_CHANNEL_SCALE,
};
pub use residency::{ExpertKey, ExpertResidency, ResidencyStats};
pub use weights::{BankWeights, DenseFfnWeights};
