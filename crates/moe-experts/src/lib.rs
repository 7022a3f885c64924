//! Expert feed-forward networks of `moe-layers`.
//!
//! The `E` experts of a layer live in one [`ExpertBank`]: each weight is a
//! stacked tensor with the expert as leading dimension, so that one expert
//! is a view (`w_in[e]`), all experts are one batched matmul, and grouped
//! GEMM kernels can read the bank without copies.

mod bank;
mod config;

pub use bank::ExpertBank;
pub use config::{Activation, ExpertConfig};
