//! One expert-parallel MoE layer, forward + backward, at P = 1, 2 and 4
//! ranks on CPU (c10d's Gloo, the ranks as threads of this process over
//! 127.0.0.1): time per step on each rank, the forward pass's time in the
//! token exchanges and in the experts, and the bytes each rank sends. P = 1
//! runs the same code path with every expert local (its exchange is a
//! local copy).
//!
//! ```sh
//! cargo xtask run run --release -p moe-lab --bin ep_bench -- --out docs/results/cpu/ep_bench.json
//! ```
//!
//! The ranks share this machine's cores, so the absolute times measure the
//! machine, not a cluster; what carries over is the split between exchange
//! and experts and the bytes per token (docs/scale-out.md).

use clap::Parser;
use moe_layers::aten::dist::{Group, GroupOptions};
use moe_layers::block::{SparseMoe, SparseMoeConfig};
use moe_layers::dispatch::{DispatchKind, ExchangeMode, ExpertParallel};
use moe_layers::experts::Activation;
use moe_layers::routers::{Gate, RouterConfig};
use moe_layers::{MoeError, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(version)]
#[command(about = "Time an expert-parallel MoE layer at 1, 2 and 4 ranks (Gloo, CPU)")]
struct Args {
    /// Tokens per rank
    #[arg(long, default_value_t = 2048)]
    tokens: i64,
    /// Model width d
    #[arg(long, default_value_t = 256)]
    width: i64,
    /// Hidden width of each expert
    #[arg(long, default_value_t = 512)]
    hidden: i64,
    /// Experts E of the layer (spread over the ranks)
    #[arg(long, default_value_t = 8)]
    experts: i64,
    /// Experts per token k
    #[arg(long, default_value_t = 2)]
    top_k: i64,
    /// Timed steps (after 2 warm-up steps)
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Rank counts to measure
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    ranks: Vec<i64>,
    /// How tokens are exchanged between ranks
    #[arg(long, value_enum, default_value_t = ExchangeMode::Dropless)]
    exchange: ExchangeMode,
    /// Where to write the table as JSON
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the cost model of docs/scale-out.md instead of measuring
    #[arg(long)]
    cost_model: bool,
}

/// One row of the table: means over the timed steps and the ranks.
#[derive(Debug, Serialize)]
struct Row {
    ranks: i64,
    tokens_per_rank: i64,
    step_ms: f64,
    forward_exchange_ms: f64,
    forward_experts_ms: f64,
    sent_mb_per_step: f64,
    sent_bytes_per_token: f64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.cost_model {
        print_cost_model();
        return Ok(());
    }
    let mode = args.exchange;
    let config = SparseMoeConfig {
        n_embd: args.width,
        num_experts: args.experts,
        top_k: args.top_k,
        expert_hidden: args.hidden,
        dropout: 0.0,
        activation: Activation::SwiGlu,
        expert_bias: false,
        router: RouterConfig {
            bias: false,
            capacity_factor: (mode == ExchangeMode::Capacity).then_some(1.25),
            ..RouterConfig::with_gate(Gate::TopK {
                norm_topk_prob: true,
            })
        },
        dispatch: DispatchKind::Grouped,
        ..SparseMoeConfig::default()
    };
    println!(
        "one MoE layer, forward + backward: {} tokens per rank, d = {}, {} experts of {} \
         (top-{}), {:?} exchange",
        args.tokens, args.width, args.experts, args.hidden, args.top_k, mode
    );
    println!("| ranks | ms per step | forward exchange ms | forward experts ms | MB sent per rank and step | bytes per token |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &p in &args.ranks {
        let row = measure(&args, &config, mode, p)?;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
            row.ranks,
            row.step_ms,
            row.forward_exchange_ms,
            row.forward_experts_ms,
            row.sent_mb_per_step,
            row.sent_bytes_per_token
        );
        rows.push(row);
    }
    if let Some(path) = &args.out {
        let json = serde_json::json!({ "args": format!("{args:?}"), "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&json).expect("json"))
            .map_err(|e| MoeError::io(path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs `p` ranks as threads; the mean row over them.
fn measure(args: &Args, config: &SparseMoeConfig, mode: ExchangeMode, p: i64) -> Result<Row> {
    let options = GroupOptions::default();
    let groups = Group::in_process(p, &options)?;
    let results: Vec<Result<(f64, f64, f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let config = config.clone();
                scope.spawn(move || rank_run(args, config, mode, group))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(MoeError::Distributed("a rank panicked".into())))
            })
            .collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>>>()?;
    let mean = |f: fn(&(f64, f64, f64, f64)) -> f64| results.iter().map(f).sum::<f64>() / p as f64;
    let steps = args.steps as f64;
    let bytes = mean(|r| r.3) / steps;
    Ok(Row {
        ranks: p,
        tokens_per_rank: args.tokens,
        step_ms: 1e3 * mean(|r| r.0) / steps,
        forward_exchange_ms: 1e3 * mean(|r| r.1) / steps,
        forward_experts_ms: 1e3 * mean(|r| r.2) / steps,
        sent_mb_per_step: bytes / 1e6,
        sent_bytes_per_token: bytes / args.tokens as f64,
    })
}

/// One rank: warm-up, then timed steps; (step s, exchange s, experts s, bytes).
fn rank_run(
    args: &Args,
    config: SparseMoeConfig,
    mode: ExchangeMode,
    group: Group,
) -> Result<(f64, f64, f64, f64)> {
    tch::set_num_threads(1);
    tch::manual_seed(group.rank());
    let parallel = ExpertParallel::new(Arc::new(Mutex::new(group)), config.num_experts, mode)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = SparseMoe::new_expert_parallel(&vs.root(), config, parallel.clone())?;
    let x = Tensor::randn([args.tokens, args.width], (Kind::Float, Device::Cpu));
    let step = || -> Result<()> {
        let out = layer.forward_t(&x, true)?;
        out.output.sum(Kind::Float).backward();
        Ok(())
    };
    for _ in 0..2 {
        step()?;
    }
    parallel.reset_stats();
    let started = Instant::now();
    for _ in 0..args.steps {
        step()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = parallel.stats();
    Ok((
        elapsed,
        stats.exchange_s,
        stats.expert_s,
        stats.bytes_sent as f64,
    ))
}

/// The cost model of docs/scale-out.md: per token and MoE layer, a training
/// step moves `4 k d b` bytes through all-to-all (each of the `k` slots'
/// rows there and back, forward and backward; `b` bytes per value), of
/// which the fraction `(P - G) / P` crosses between machines of `G` GPUs
/// (uniform routing) and `(G - 1) / P` stays on NVLink, against
/// `18 k d h` FLOPs of SwiGLU experts (3 GEMMs of `d x h`, forward and twice
/// that backward). The ratio is all-to-all time over expert time.
fn print_cost_model() {
    // H100 SXM: ~600 TFLOP/s of bf16 reached in grouped GEMMs (of 989 peak),
    // NVLink 4 ~450 GB/s per direction, one 400 Gb/s InfiniBand NDR port
    // (50 GB/s) per GPU.
    let (flops, nvlink, infiniband, gpus_per_node, b): (f64, f64, f64, f64, f64) =
        (600e12, 450e9, 50e9, 8.0, 2.0);
    println!("assumptions: {:.0} TFLOP/s per GPU, NVLink {:.0} GB/s, InfiniBand {:.0} GB/s per GPU, {gpus_per_node} GPUs per machine, bf16", flops / 1e12, nvlink / 1e9, infiniband / 1e9);
    println!("| experts (d, h) | GPUs P | bytes per token and layer | NVLink time / expert time | InfiniBand time / expert time | all-to-all / experts |");
    println!("|---|---|---|---|---|---|");
    for (name, d, h, k) in [
        ("Mixtral 8x7B (4096, 14336), k = 2", 4096.0, 14336.0, 2.0),
        ("DeepSeek-V3 (7168, 2048), k = 8", 7168.0, 2048.0, 8.0),
    ] {
        for p in [8.0f64, 16.0, 32.0, 64.0] {
            let bytes = 4.0 * k * d * b;
            let expert_s = 18.0 * k * d * h / flops;
            let local = (gpus_per_node.min(p) - 1.0) / p;
            let remote = ((p - gpus_per_node) / p).max(0.0);
            let nv = bytes * local / nvlink / expert_s;
            let ib = bytes * remote / infiniband / expert_s;
            println!(
                "| {name} | {p:.0} | {:.0} | {nv:.2} | {ib:.2} | {:.2} |",
                bytes,
                nv + ib
            );
        }
    }
}
