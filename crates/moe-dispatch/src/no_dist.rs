//! The expert-parallel types in a build without the `dist` feature (no
//! c10d, no C++ shim). No value of them can exist, so every
//! `Option<&ExpertParallelism>` a layer or model takes is `None` and their
//! signatures are the same in both builds; the methods below can never run.

use moe_core::{Result, Routing};
use moe_experts::ExpertBank;
use tch::Tensor;

/// How a model spreads its experts over ranks: needs the `dist` feature,
/// without which no value of this type exists.
#[derive(Debug, Clone)]
pub enum ExpertParallelism {}

impl ExpertParallelism {
    /// The split of one layer (unreachable without `dist`).
    pub fn layer(&self, _num_experts: i64) -> Result<ExpertParallel> {
        match *self {}
    }
}

/// One layer's experts spread over ranks: needs the `dist` feature, without
/// which no value of this type exists.
#[derive(Debug)]
pub enum ExpertParallel {}

impl ExpertParallel {
    /// Number of ranks (unreachable without `dist`).
    pub fn world_size(&self) -> i64 {
        match *self {}
    }

    /// Experts of the layer, over all ranks (unreachable without `dist`).
    pub fn num_experts(&self) -> i64 {
        match *self {}
    }

    /// Experts on this rank (unreachable without `dist`).
    pub fn local_experts(&self) -> i64 {
        match *self {}
    }

    /// The global id of this rank's first expert (unreachable without `dist`).
    pub fn first_expert(&self) -> i64 {
        match *self {}
    }

    /// The layer's output (unreachable without `dist`).
    pub fn combine(&self, _: &Tensor, _: &Routing, _: &ExpertBank, _: bool) -> Result<Tensor> {
        match *self {}
    }

    /// Slots per expert over all ranks (unreachable without `dist`).
    pub fn global_counts(&self, _: &Routing) -> Result<Tensor> {
        match *self {}
    }
}
