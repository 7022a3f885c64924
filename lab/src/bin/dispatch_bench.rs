//! Times one sparse MoE FFN layer per dispatch strategy against the dense
//! FFN with the same active FLOPs, and prints one JSON line per case and mode:
//!
//! `{"case":"mid","device":"cpu","dtype":"f32","mode":"fwd_bwd","dense_ms":..,
//!   "strategies":{"grouped":{"ms":..,"ratio":..},..}}`
//!
//! `cargo xtask run run --release -p moe-lab --bin dispatch_bench -- [--quick] [--device cuda]`
//! CPU runs the fp32 cases; `--device cuda` runs the bf16 cases on the GPU.

use clap::Parser;
use moe_layers::prelude::DeviceChoice;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tch::{Device, Kind};

use moe_lab::dispatch_cases::{
    dense_layer, moe_layer, Case, Layer, CPU_CASES, CUDA_CASES, STRATEGIES,
};

#[derive(Parser, Debug)]
#[command(version)]
#[command(about = "Dispatch strategies vs a FLOP-matched dense FFN")]
struct Args {
    /// Where to measure (auto: the GPU when there is one)
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Fewer repetitions and the smaller cases only (under a minute on CPU)
    #[arg(long)]
    quick: bool,
    /// Only cases whose name contains this
    #[arg(long)]
    case: Option<String>,
}

fn main() {
    let args = Args::parse();
    let (device, kind, all_cases): (Device, Kind, &[Case]) = match args.device.resolve() {
        Ok(Device::Cpu) => (Device::Cpu, Kind::Float, &CPU_CASES),
        Ok(device) => (device, Kind::BFloat16, &CUDA_CASES),
        Err(e) => fail(&e.to_string()),
    };
    let budget = Duration::from_millis(if args.quick { 300 } else { 2000 });
    for case in all_cases {
        if args.case.as_deref().is_some_and(|c| !case.name.contains(c)) {
            continue;
        }
        if args.quick && case.n * case.k * case.h > 4096 * 2 * 1024 {
            continue;
        }
        for backward in [false, true] {
            let dense_ms = time_ms(&dense_layer(case, device, kind), backward, device, budget);
            let mut strategies = Map::new();
            for dispatch in STRATEGIES {
                let layer = moe_layer(case, dispatch, device, kind);
                let ms = time_ms(&layer, backward, device, budget);
                let name = dispatch.build().name();
                strategies.insert(name.into(), json!({"ms": ms, "ratio": ms / dense_ms}));
            }
            let line = json!({
                "case": case.name, "n": case.n, "d": case.d, "h": case.h, "e": case.e, "k": case.k,
                "device": format!("{device:?}"), "dtype": format!("{kind:?}"),
                "mode": if backward { "fwd_bwd" } else { "fwd" },
                "dense_ms": dense_ms, "strategies": Value::Object(strategies),
            });
            println!("{line}");
        }
    }
}

/// Median milliseconds per call after warm-up, repeating until `budget` is spent.
fn time_ms(layer: &Layer, backward: bool, device: Device, budget: Duration) -> f64 {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..3 {
        layer.step(backward);
    }
    sync();
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < 5 || (started.elapsed() < budget && samples.len() < 200) {
        let t = Instant::now();
        layer.step(backward);
        sync();
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
