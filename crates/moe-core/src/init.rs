//! Parameter creation: how weights are drawn ([`WeightInit`]), and the
//! allocation-only mode a checkpoint loader builds its model in
//! ([`allocate_only`]): every variable of the library is created through
//! [`var`], which draws its initial values, or, inside [`allocate_only`],
//! only allocates them (their values are whatever the memory held, to be
//! overwritten from a file).

use serde::{Deserialize, Serialize};
use std::cell::Cell;
use tch::{nn, Tensor};

thread_local! {
    /// Inside [`allocate_only`] on this thread.
    static ALLOCATE_ONLY: Cell<bool> = const { Cell::new(false) };
    /// Variables [`var`] has drawn on this thread ([`variables_drawn`]).
    static DRAWN: Cell<u64> = const { Cell::new(0) };
}

/// Runs `f` with [`var`] allocating its variables without drawing or
/// writing them (`torch.empty`, in the path's dtype and on its device):
/// for a model whose every parameter is read from a checkpoint next, so
/// that no time goes into random numbers that are overwritten and no page
/// is touched before the file's values land in it. Nested calls are fine;
/// the previous mode is restored when `f` returns or unwinds.
pub fn allocate_only<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALLOCATE_ONLY.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ALLOCATE_ONLY.with(|a| a.replace(true)));
    f()
}

/// How many variables [`var`] has initialised (drawn or filled) on this
/// thread so far: a loader's tests check that loading draws none.
pub fn variables_drawn() -> u64 {
    DRAWN.with(Cell::get)
}

/// The variable `name` of shape `dims` under `p`, trainable, in `p`'s
/// dtype and on its device: initialised by `init`, or, inside
/// [`allocate_only`], allocated only. Every parameter of the library's
/// layers is created here.
pub fn var(p: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
    if ALLOCATE_ONLY.with(Cell::get) {
        p.add(name, Tensor::empty(dims, (p.kind(), p.device())), true)
    } else {
        DRAWN.with(|n| n.set(n.get() + 1));
        p.var(name, dims, init)
    }
}

/// Rows `rows` (of the first dimension) of the variable [`var`] creates
/// for `dims`: the whole `dims` is drawn, as [`var`] draws it, and only
/// these rows are kept, as the variable `name` of shape
/// `[rows.len(), dims[1..]]`. Expert parallelism builds a rank's share of
/// an expert bank so: the generator advances as it does for the whole
/// bank, so the ranks together hold the model one process draws with the
/// same seed, and the layers after the bank draw what they draw there.
pub fn var_rows(
    p: &nn::Path,
    name: &str,
    dims: &[i64],
    init: nn::Init,
    rows: std::ops::Range<i64>,
) -> Tensor {
    let mut shape = dims.to_vec();
    shape[0] = rows.end - rows.start;
    if ALLOCATE_ONLY.with(Cell::get) {
        return p.add(name, Tensor::empty(&shape, (p.kind(), p.device())), true);
    }
    DRAWN.with(|n| n.set(n.get() + 1));
    let drawn = nn::f_init(init, dims, p.device(), p.kind())
        .expect("drawing initial values with libtorch's initialisers");
    p.add(
        name,
        drawn.narrow(0, rows.start, shape[0]).contiguous(),
        true,
    )
}

/// How the weight matrices of linear layers (and expert banks) are drawn.
/// Biases always follow PyTorch's `nn.Linear` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum WeightInit {
    /// Kaiming He normal, fan-in mode, ReLU gain: N(0, 2 / fan_in)
    /// (He et al. 2015, arXiv 1502.01852). makeMoE's choice, because experts use ReLU.
    #[default]
    Kaiming,
    /// Xavier/Glorot normal: N(0, 2 / (fan_in + fan_out)) (Glorot & Bengio 2010),
    /// the usual transformer choice that the makeMoE tutorial suggests trying.
    Xavier,
}

impl WeightInit {
    /// The initialiser of a weight with the given fans.
    pub fn weight(self, fan_in: i64, fan_out: i64) -> nn::Init {
        let stdev = match self {
            WeightInit::Kaiming => (2.0 / fan_in as f64).sqrt(),
            WeightInit::Xavier => (2.0 / (fan_in + fan_out) as f64).sqrt(),
        };
        nn::Init::Randn { mean: 0.0, stdev }
    }

    /// PyTorch's default bias initialiser for a layer of this fan-in.
    pub fn bias(fan_in: i64) -> nn::Init {
        let bound = 1.0 / (fan_in as f64).sqrt();
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        }
    }
}

impl std::str::FromStr for WeightInit {
    type Err = crate::MoeError;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kaiming" | "he" => Ok(WeightInit::Kaiming),
            "xavier" | "glorot" => Ok(WeightInit::Xavier),
            other => Err(crate::MoeError::config(format!(
                "unknown init `{other}`: expected kaiming or xavier"
            ))),
        }
    }
}

/// [`var`] for a stack of matrices `dims = [n, a, b]` held in memory as
/// `[n, b, a]` and seen transposed: each `[a, b]` matrix is column-major,
/// so that `x @ m` (`x: [t, a]`) reads it as BLAS reads an `nn.Linear`
/// weight (`x @ W^T` with `W: [b, a]` row-major). bf16 products on CPUs
/// take a fast path only in that layout (a `[1, 2048] x [2048, 1024]`
/// product: 5.2 ms with row-major `[a, b]`, 0.38 ms column-major, on the
/// development machine; `cargo test -p moe-layers-experts --test int8 --
/// --ignored --nocapture gemv_timing`), and checkpoints store experts that
/// way, so loading copies whole contiguous matrices. The initial values
/// are those [`var`] draws for `dims`.
pub fn var_column_major(p: &nn::Path, name: &str, dims: [i64; 3], init: nn::Init) -> Tensor {
    var_column_major_rows(p, name, dims, init, 0..dims[0])
}

/// [`var_column_major`] keeping the matrices `rows` of the stack only, as
/// [`var_rows`] does: the whole stack is drawn, these matrices are kept.
pub fn var_column_major_rows(
    p: &nn::Path,
    name: &str,
    dims: [i64; 3],
    init: nn::Init,
    rows: std::ops::Range<i64>,
) -> Tensor {
    let [_, a, b] = dims;
    let n = rows.end - rows.start;
    let stored = Tensor::empty([n, b, a], (p.kind(), p.device())).transpose(1, 2);
    if !ALLOCATE_ONLY.with(Cell::get) {
        DRAWN.with(|k| k.set(k.get() + 1));
        tch::no_grad(|| {
            let drawn = nn::f_init(init, &dims, p.device(), p.kind())
                .expect("drawing initial values with libtorch's initialisers");
            stored
                .shallow_clone()
                .copy_(&drawn.narrow(0, rows.start, n))
        });
    }
    p.add(name, stored, true)
}

/// A `Linear(fan_in -> fan_out)` whose weight `p/weight` (`[fan_out,
/// fan_in]`, as PyTorch's `nn.Linear`) follows `init` and whose bias
/// `p/bias` (when present) follows PyTorch's default; created by [`var`].
pub fn linear(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool, init: WeightInit) -> nn::Linear {
    // The bias first, as tch's `nn::linear` draws them (seeded runs keep
    // their initial values).
    let bs = bias.then(|| var(&p, "bias", &[fan_out], WeightInit::bias(fan_in)));
    nn::Linear {
        ws: var(
            &p,
            "weight",
            &[fan_out, fan_in],
            init.weight(fan_in, fan_out),
        ),
        bs,
    }
}
