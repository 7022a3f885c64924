//! Criterion benchmarks of one sparse MoE FFN layer per dispatch strategy
//! against the dense FFN with the same active FLOPs (d -> k h -> d), CPU fp32.
//!
//! `cargo xtask run bench -p moe-lab --bench dispatch` (add `-- makemoe` to filter).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;
use tch::{Device, Kind};

use moe_lab::dispatch_cases::{dense_layer, moe_layer, CPU_CASES, STRATEGIES};

fn dispatch(c: &mut Criterion) {
    for case in CPU_CASES {
        for backward in [false, true] {
            let mode = if backward { "fwd_bwd" } else { "fwd" };
            let mut group = c.benchmark_group(format!("{}/{mode}", case.name));
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            let dense = dense_layer(&case, Device::Cpu, Kind::Float);
            group.bench_function("dense_ffn", |b| b.iter(|| dense.step(backward)));
            for kind in STRATEGIES {
                let layer = moe_layer(&case, kind, Device::Cpu, Kind::Float);
                let name = layer_name(kind);
                group.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter(|| layer.step(backward))
                });
            }
            group.finish();
        }
    }
}

fn layer_name(kind: moe_layers::dispatch::DispatchKind) -> String {
    kind.build().name().to_string()
}

criterion_group! {
    name = benches;
    // No plots: criterion's plotters backend panics on machines without
    // system fonts (CI, containers); the numbers are in the terminal and
    // in target/criterion/*/new/estimates.json.
    config = Criterion::default().without_plots();
    targets = dispatch
}
criterion_main!(benches);
