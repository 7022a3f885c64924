//! The sparse Mixture-of-Experts layer of `moe-layers`: a router, a bank of
//! experts and a dispatch strategy composed into [`SparseMoe`], the drop-in
//! replacement for a transformer's feed-forward network.
#![warn(missing_docs)]

mod config;
mod sparse_moe;

pub use config::{FineGrained, SharedExperts, SparseMoeConfig};
pub use sparse_moe::{MoeOutput, SparseMoe};
