//! CUDA checks: every dispatch strategy equals the dense reference on the
//! GPU, in fp32 (values and gradients) and bf16 (values), and the language
//! model trains there. They are `#[ignore]`d, so that a machine without a
//! GPU (CI) counts them as ignored, not passed; on a GPU machine:
//! `MOE_CUDA_TESTS=1 cargo xtask run test --test cuda -- --ignored`.
//! Without `MOE_CUDA_TESTS=1` an ignored test that is asked for returns
//! at once, saying so on stderr.

use moe_layers::block::{SparseMoe, SparseMoeConfig};
use moe_layers::dispatch::DispatchKind;
use moe_layers::experts::Activation;
use moe_layers::lm::{CharTokenizer, Dataset, MakeMoeConfig, MakeMoeModel, TrainConfig, Trainer};
use moe_layers::routers::RouterConfig;
use tch::{nn, Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if std::env::var("MOE_CUDA_TESTS").as_deref() != Ok("1") {
        eprintln!("not run: set MOE_CUDA_TESTS=1 on a machine with a GPU to run the CUDA tests");
        return None;
    }
    assert!(
        tch::Cuda::is_available(),
        "MOE_CUDA_TESTS=1 but libtorch sees no CUDA device"
    );
    Some(Device::Cuda(0))
}

/// Output and gradient of x of one layer under `kind`.
fn run(moe: &mut SparseMoe, kind: DispatchKind, x: &Tensor) -> (Tensor, Tensor) {
    moe.set_dispatch(kind.build());
    let x = x.detach().set_requires_grad(true);
    let y = moe.forward_t(&x, false).unwrap().output;
    let w = y.ones_like().cumsum(0, Kind::Float).to_kind(y.kind());
    (&y * w).sum(Kind::Float).backward();
    (y.detach(), x.grad())
}

#[test]
#[ignore = "needs MOE_CUDA_TESTS=1 and a GPU"]
fn every_strategy_equals_the_dense_reference_on_cuda() {
    let Some(device) = cuda() else { return };
    for (n, d, h, e, k) in [
        (512, 128, 512, 8, 2),
        (300, 64, 128, 16, 4),
        (1, 32, 64, 4, 2),
    ] {
        // makeMoE's ReLU experts with biases; SwiGLU experts without (Mixtral,
        // Qwen2-MoE, DeepSeek, OLMoE).
        let banks = [(Activation::Relu, true), (Activation::SwiGlu, false)];
        for ((activation, expert_bias), kind) in banks
            .into_iter()
            .flat_map(|b| [Kind::Float, Kind::BFloat16].map(|k| (b, k)))
        {
            tch::manual_seed(0);
            let mut vs = nn::VarStore::new(device);
            let config = SparseMoeConfig {
                n_embd: d,
                num_experts: e,
                top_k: k,
                expert_hidden: h,
                dropout: 0.0,
                // A capacity factor of E gives C = N k: nothing can overflow,
                // so the capacity strategy must equal the dropless ones.
                router: RouterConfig {
                    capacity_factor: Some(e as f64),
                    ..Default::default()
                },
                activation,
                expert_bias,
                ..Default::default()
            };
            let mut moe = SparseMoe::new(&vs.root(), config).unwrap();
            vs.set_kind(kind);
            let x = Tensor::randn([n, d], (Kind::Float, device)).to_kind(kind);
            let (y_ref, g_ref) = run(&mut moe, DispatchKind::DenseReference, &x);
            let tol = if kind == Kind::Float { 1e-4 } else { 5e-2 };
            for strategy in [
                DispatchKind::MaskLoop,
                DispatchKind::IndexedLoop,
                DispatchKind::Grouped,
                DispatchKind::Auto,
                DispatchKind::Capacity,
            ] {
                let (y, g) = run(&mut moe, strategy, &x);
                let scale = y_ref.abs().max().double_value(&[]).max(1.0);
                let dy = (&y - &y_ref).abs().max().double_value(&[]);
                assert!(
                    dy <= tol * scale,
                    "{strategy:?} {kind:?} {activation:?} bias={expert_bias} N={n}: output differs by {dy}"
                );
                if kind == Kind::Float {
                    let gs = g_ref.abs().max().double_value(&[]).max(1.0);
                    let dg = (&g - &g_ref).abs().max().double_value(&[]);
                    assert!(dg <= tol * gs, "{strategy:?} N={n}: grad differs by {dg}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs MOE_CUDA_TESTS=1 and a GPU"]
fn the_language_model_trains_on_cuda() {
    let Some(device) = cuda() else { return };
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let tok = CharTokenizer::from_text(&text).unwrap();
    tch::manual_seed(1337);
    let config = MakeMoeConfig {
        vocab_size: tok.vocab_size(),
        ..MakeMoeConfig::default()
    };
    let vs = nn::VarStore::new(device);
    let model = MakeMoeModel::new(&vs.root(), &config).unwrap();
    let data = Dataset::new(
        &tok.encode(&text).unwrap(),
        tok.vocab_size(),
        0.9,
        32,
        device,
    )
    .unwrap();
    let train = TrainConfig {
        max_iters: 200,
        eval_interval: 199,
        eval_iters: 20,
        ..TrainConfig::default()
    };
    let mut evals = Vec::new();
    Trainer::new(&vs, &model, &data, train)
        .unwrap()
        .run(|e| {
            if let moe_layers::lm::TrainEvent::Eval { val_loss, .. } = e {
                evals.push(*val_loss);
            }
            Ok(())
        })
        .unwrap();
    assert!(evals[0] > 3.5 && evals[1] < 2.8, "val losses {evals:?}");
}
