use moe_core::MoeError;
use moe_nn::{AttentionConfig, AttentionPath, AttentionScale, CausalSelfAttention};
use tch::{nn, Device, Kind, Tensor};

fn config(scale: AttentionScale) -> AttentionConfig {
    AttentionConfig {
        n_embd: 32,
        n_head: 4,
        block_size: 16,
        dropout: 0.1,
        scale,
        ..Default::default()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn output_and_grad(attn: &CausalSelfAttention, x: &Tensor) -> (Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let y = attn.forward_t(&x, false).unwrap();
    // A non-uniform weighting so that the gradient depends on every output.
    let w = Tensor::arange(y.numel() as i64, (Kind::Float, Device::Cpu))
        .view(y.size().as_slice())
        .sin();
    let g = Tensor::run_backward(&[(&y * w).sum(Kind::Float)], &[&x], false, false);
    (y.detach(), g[0].shallow_clone())
}

#[test]
fn per_head_and_fused_paths_agree_in_values_and_gradients() {
    for scale in [AttentionScale::HeadSize, AttentionScale::Embedding] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut attn = CausalSelfAttention::new(&vs.root(), config(scale)).unwrap();
        let x = Tensor::randn([3, 16, 32], (Kind::Float, Device::Cpu));
        attn.set_path(AttentionPath::Fused);
        let (y_fused, g_fused) = output_and_grad(&attn, &x);
        attn.set_path(AttentionPath::PerHead);
        let (y_heads, g_heads) = output_and_grad(&attn, &x);
        assert!(
            y_fused.abs().max().double_value(&[]) > 1e-3,
            "output is not trivial"
        );
        assert!(
            max_abs_diff(&y_fused, &y_heads) < 1e-5,
            "{scale:?}: outputs differ"
        );
        assert!(
            max_abs_diff(&g_fused, &g_heads) < 1e-4,
            "{scale:?}: gradients differ"
        );
    }
}

#[test]
fn changing_a_token_never_changes_earlier_outputs() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut attn = CausalSelfAttention::new(&vs.root(), config(AttentionScale::HeadSize)).unwrap();
    for path in [AttentionPath::Fused, AttentionPath::PerHead] {
        attn.set_path(path);
        let x = Tensor::randn([2, 12, 32], (Kind::Float, Device::Cpu));
        let y = attn.forward_t(&x, false).unwrap();
        for t in [0i64, 5, 11] {
            let x2 = x.copy();
            let _ = x2.narrow(1, t, 1).fill_(3.0);
            let y2 = attn.forward_t(&x2, false).unwrap();
            if t > 0 {
                let before = max_abs_diff(&y.narrow(1, 0, t), &y2.narrow(1, 0, t));
                assert!(
                    before < 1e-6,
                    "{path:?}: position < {t} changed by {before}"
                );
            }
            let at = max_abs_diff(&y.narrow(1, t, 1), &y2.narrow(1, t, 1));
            assert!(at > 1e-4, "{path:?}: position {t} ignored its own input");
        }
    }
}

#[test]
fn scale_factor_matches_the_formula() {
    let c = config(AttentionScale::HeadSize);
    assert!((c.scale_factor() - 8f64.powf(-0.5)).abs() < 1e-12);
    let c = config(AttentionScale::Embedding);
    assert!((c.scale_factor() - 32f64.powf(-0.5)).abs() < 1e-12);
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let bad = AttentionConfig {
        n_embd: 30,
        n_head: 4,
        ..config(AttentionScale::HeadSize)
    };
    let err = CausalSelfAttention::new(&vs.root(), bad).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
    assert!(err.to_string().contains("divisible"), "{err}");

    let attn = CausalSelfAttention::new(&vs.root(), config(AttentionScale::HeadSize)).unwrap();
    let cases = [
        Tensor::zeros([4, 32], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, 4, 31], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, 4, 32], (Kind::Int64, Device::Cpu)),
        Tensor::zeros([1, 17, 32], (Kind::Float, Device::Cpu)),
    ];
    let errs: Vec<MoeError> = cases
        .iter()
        .map(|x| attn.forward_t(x, false).unwrap_err())
        .collect();
    assert!(matches!(errs[0], MoeError::Shape { .. }), "{}", errs[0]);
    assert!(matches!(errs[1], MoeError::Shape { .. }), "{}", errs[1]);
    assert!(matches!(errs[2], MoeError::Kind { .. }), "{}", errs[2]);
    assert!(
        matches!(
            errs[3],
            MoeError::SequenceTooLong {
                len: 17,
                block_size: 16
            }
        ),
        "{}",
        errs[3]
    );
}

#[test]
fn training_path_with_dropout_computes_scaled_dot_product_attention() {
    // A dropout probability that rounds to "keep everything" sends training
    // through the CPU math path (scores, causal mask, softmax, mask
    // dropout) while dropping nothing: it must give libtorch's
    // `scaled_dot_product_attention` output of evaluation mode.
    tch::manual_seed(2);
    let vs = nn::VarStore::new(Device::Cpu);
    let tiny = AttentionConfig {
        dropout: 1e-9,
        ..config(AttentionScale::HeadSize)
    };
    let attn = CausalSelfAttention::new(&vs.root(), tiny).unwrap();
    let x = Tensor::randn([3, 16, 32], (Kind::Float, Device::Cpu));
    let train = attn.forward_t(&x, true).unwrap();
    let eval = attn.forward_t(&x, false).unwrap();
    assert!(max_abs_diff(&train, &eval) < 1e-5);
}

#[test]
fn training_drops_attention_weights_at_the_configured_rate() {
    // With p = 0.5 on the attention weights and the output, an output element
    // averaged over many draws converges to its evaluation value (inverted
    // dropout is unbiased), and single draws differ from it.
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let half = AttentionConfig {
        dropout: 0.5,
        ..config(AttentionScale::HeadSize)
    };
    let attn = CausalSelfAttention::new(&vs.root(), half).unwrap();
    let x = Tensor::randn([1, 16, 32], (Kind::Float, Device::Cpu));
    let eval = attn.forward_t(&x, false).unwrap();
    let draws = 4000;
    let mean = tch::no_grad(|| {
        let batch = x.expand([draws, 16, 32], false).contiguous();
        attn.forward_t(&batch, true)
            .unwrap()
            .mean_dim(0, true, Kind::Float)
    });
    let one = tch::no_grad(|| attn.forward_t(&x, true).unwrap());
    assert!(max_abs_diff(&one, &eval) > 1e-2, "nothing was dropped");
    let scale = eval.abs().max().double_value(&[]);
    let err = max_abs_diff(&mean, &eval);
    assert!(
        err < 0.1 * scale,
        "mean over draws off by {err} (scale {scale})"
    );
}
