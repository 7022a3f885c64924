// src/main.rs
use moe_layers::prelude::*;
use moe_layers::tch::{nn, Device, Kind, Tensor}; // the tch moe-layers uses

fn main() -> moe_layers::Result<()> {
    let vs = nn::VarStore::new(Device::cuda_if_available());
    let config = SparseMoeConfig {
        n_embd: 64,
        num_experts: 8,
        top_k: 2,
        ..Default::default()
    };
    let moe = SparseMoe::new(&vs.root(), config)?;
    let y = moe.forward_t(
        &Tensor::randn([4, 16, 64], (Kind::Float, vs.device())),
        false,
    )?;
    println!("{:?}", y.output.size());
    Ok(())
}
