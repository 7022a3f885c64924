use tch::{Device, Kind, Tensor};

/// Inverted dropout (Srivastava et al. 2014, JMLR 15): in training,
///
/// ```text
/// y = x * m / (1 - p),   m_i ~ Bernoulli(1 - p) independently,
/// ```
///
/// and `y = x` otherwise, as `torch.nn.functional.dropout`.
///
/// On GPUs this is libtorch's own dropout (a fused Philox kernel). On CPUs
/// the mask comes from [`keep_mask`]: libtorch draws a CPU Bernoulli mask
/// one 64-bit Mersenne-Twister output per element in a single-threaded
/// loop, which made the makeMoE model's 2.6 M dropout draws a step about a
/// tenth of its CPU training step; `keep_mask` draws a quarter as many
/// words. Both take their randomness from libtorch's default generator,
/// so `tch::manual_seed` makes runs repeatable either way.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    if x.device() != Device::Cpu {
        return x.dropout(p, true);
    }
    x * keep_scale(&x.size(), p, x.kind())
}

/// The dropout factor `m / (1 - p)` of [`dropout`] on a CPU, `[shape]` in
/// `kind`: `1 / (1 - p)` where [`keep_mask`] keeps, 0 elsewhere. Outside
/// autograd: gradients flow through the product with it.
fn keep_scale(shape: &[i64], p: f64, kind: Kind) -> Tensor {
    let keep = keep_mask(shape, p, Device::Cpu);
    tch::no_grad(|| Tensor::where_scalar(&keep, 1.0 / (1.0 - p), 0.0).to_kind(kind))
}

/// A boolean mask of `shape`, each element independently true with
/// probability `1 - p`, where `p` is rounded to a multiple of `2^-16`
/// (`p = 0.1` drops with probability `6554 / 65536 = 0.100006`).
///
/// Each uniform 64-bit word of libtorch's generator (`random_` over the
/// full `i64` range) is read as four uniform 16-bit lanes, and lane `u` is
/// kept when `u >= round(p * 2^16) - 2^15` (lanes are signed).
pub fn keep_mask(shape: &[i64], p: f64, device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let threshold = (p.clamp(0.0, 1.0) * 65536.0).round() as i64 - 32768;
    if threshold > i64::from(i16::MAX) {
        // Nothing is kept (and the i16 comparison could not say so).
        return Tensor::zeros(shape, (Kind::Bool, device));
    }
    let mut words = Tensor::empty([(n + 3) / 4], (Kind::Int64, device));
    let _ = words.random_from_(i64::MIN, None);
    words
        .view_dtype(Kind::Int16)
        .narrow(0, 0, n)
        .view(shape)
        .ge(threshold)
}
