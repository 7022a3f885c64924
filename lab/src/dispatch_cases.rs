//! Benchmark cases shared by `lab/benches/dispatch.rs` (criterion) and
//! `dispatch_bench` (JSON lines, CPU and CUDA): one sparse MoE FFN layer
//! per strategy, and the dense FFN with the same active FLOPs.

use moe_layers::block::{SparseMoe, SparseMoeConfig};
use moe_layers::dispatch::{DispatchKind, DEFAULT_CAPACITY_FACTOR};
use moe_layers::routers::{Gate, RouterConfig};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// One benchmark size: `n` tokens of width `d`, `e` experts of hidden `h`, top-`k`.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub n: i64,
    pub d: i64,
    pub h: i64,
    pub e: i64,
    pub k: i64,
}

/// The CPU fp32 cases.
pub const CPU_CASES: [Case; 3] = [
    Case {
        name: "makemoe",
        n: 512,
        d: 128,
        h: 512,
        e: 8,
        k: 2,
    },
    Case {
        name: "mid",
        n: 4096,
        d: 256,
        h: 1024,
        e: 8,
        k: 2,
    },
    Case {
        name: "fine_grained",
        n: 4096,
        d: 256,
        h: 256,
        e: 64,
        k: 8,
    },
];

/// The CUDA bf16 cases (makeMoE's own size first).
pub const CUDA_CASES: [Case; 4] = [
    Case {
        name: "makemoe",
        n: 512,
        d: 128,
        h: 512,
        e: 8,
        k: 2,
    },
    Case {
        name: "mid",
        n: 16384,
        d: 1024,
        h: 4096,
        e: 8,
        k: 2,
    },
    Case {
        name: "fine_grained",
        n: 16384,
        d: 1024,
        h: 1024,
        e: 64,
        k: 8,
    },
    Case {
        name: "large",
        n: 65536,
        d: 2048,
        h: 8192,
        e: 8,
        k: 2,
    },
];

/// The strategies that compete (the dense reference is a test oracle:
/// E/k times the work, not a contender).
pub const STRATEGIES: [DispatchKind; 5] = [
    DispatchKind::MaskLoop,
    DispatchKind::IndexedLoop,
    DispatchKind::Grouped,
    DispatchKind::Capacity,
    DispatchKind::Auto,
];

/// A layer under test: its parameters, an input, and how to run it once.
pub struct Layer {
    _vs: nn::VarStore,
    run: Box<dyn Fn(&Tensor) -> Tensor>,
    x: Tensor,
    /// Fixed output gradient (a materialised tensor, as a real loss gives).
    grad: Tensor,
}

impl Layer {
    fn new(vs: nn::VarStore, run: Box<dyn Fn(&Tensor) -> Tensor>, x: Tensor) -> Self {
        let grad = x.randn_like();
        Layer {
            _vs: vs,
            run,
            x,
            grad,
        }
    }

    /// Forward only (no graph), or forward + backward into the parameters.
    pub fn step(&self, backward: bool) {
        if backward {
            let x = self.x.detach().set_requires_grad(true);
            ((self.run)(&x) * &self.grad).sum(Kind::Float).backward();
        } else {
            tch::no_grad(|| {
                let _ = (self.run)(&self.x);
            });
        }
    }
}

fn input(case: &Case, device: Device, kind: Kind) -> Tensor {
    Tensor::randn([case.n, case.d], (Kind::Float, device)).to_kind(kind)
}

/// The sparse MoE layer (top-k router + experts) with `dispatch` (the
/// capacity strategy with the router's capacity factor at 1.25).
pub fn moe_layer(case: &Case, dispatch: DispatchKind, device: Device, kind: Kind) -> Layer {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(device);
    let config = SparseMoeConfig {
        n_embd: case.d,
        num_experts: case.e,
        top_k: case.k,
        expert_hidden: case.h,
        dropout: 0.0,
        router: RouterConfig {
            gate: Gate::TopK {
                norm_topk_prob: true,
            },
            // The capacity strategy runs at GShard's factor 1.25.
            capacity_factor: (dispatch == DispatchKind::Capacity)
                .then_some(DEFAULT_CAPACITY_FACTOR),
            ..Default::default()
        },
        dispatch,
        ..Default::default()
    };
    let moe = SparseMoe::new(&vs.root(), config).expect("benchmark config is valid");
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    let run = Box::new(move |x: &Tensor| moe.forward_t(x, true).expect("valid input").output);
    Layer::new(vs, run, input(case, device, kind))
}

/// The dense FFN with the active FLOPs of the sparse layer: d -> k h -> d.
pub fn dense_layer(case: &Case, device: Device, kind: Kind) -> Layer {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(device);
    let up = nn::linear(
        vs.root() / "up",
        case.d,
        case.k * case.h,
        Default::default(),
    );
    let down = nn::linear(
        vs.root() / "down",
        case.k * case.h,
        case.d,
        Default::default(),
    );
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    let run = Box::new(move |x: &Tensor| down.forward(&up.forward(x).relu()));
    Layer::new(vs, run, input(case, device, kind))
}
