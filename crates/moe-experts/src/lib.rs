//! Expert feed-forward networks of `moe-layers`.
//!
//! The `E` experts of a layer live in one [`ExpertBank`]: each weight is a
//! stacked tensor with the expert as leading dimension, so that one expert
//! is a view (`w_in[e]`), all experts are one batched matmul, and grouped
//! GEMM kernels can read the bank without copies. A bank can be built from
//! a dense FFN ([`split_dense_ffn`], LLaMA-MoE; [`upcycle_dense_ffn`]).
#![warn(missing_docs)]

mod bank;
mod config;
mod dense_split;
mod weights;

pub use bank::{plus_bias, ExpertBank, ExpertViews};
pub use config::{Activation, ExpertConfig};
pub use dense_split::{partition_neurons, split_dense_ffn, upcycle_dense_ffn, NeuronPartition};
pub use weights::{BankWeights, DenseFfnWeights};
