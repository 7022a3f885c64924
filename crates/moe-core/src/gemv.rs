//! One-token linear layers on the CPU: `y = x Wᵀ (+ b)` for a single row
//! `x` against a row-major `W: [N, K]` stored as bf16, or as int8 with one
//! scale per row (`y_n = s_n · Σ_k q_nk x_k`).
//!
//! Batch-1 decoding is bound by memory bandwidth: every weight is read once
//! per token and used for one multiply-add. On the 2-core AVX2 machine this
//! project is developed on, libtorch's bf16 GEMV streams about 16-20 GB/s
//! out of memory, while a streaming dot product per row (8 bf16 widened to
//! f32 by a 16-bit shift, fused multiply-add into f32 accumulators) streams
//! 1.3-1.5 times as much (21-31 GB/s): four rows at a time sharing each load of `x` for rows
//! of 4 KiB and more, one row at a time for shorter ones (the ignored test
//! `gemv_streaming` prints both kernels' GB/s). That is what this module
//! does, nothing more.
//!
//! - Arithmetic: products and sums in f32 (a bf16 or int8 weight times an
//!   f32 copy of `x` is exact in f32; the sum's rounding is f32's, as in
//!   libtorch's bf16 GEMV, which also accumulates in f32), one rounding of
//!   `x Wᵀ + b` to bf16 at the end (round to nearest even).
//! - Threads: the rows are split over libtorch's own OpenMP team
//!   (`GOMP_parallel` of the `libgomp` libtorch loaded, found with
//!   `dlsym`), so the kernel never competes with libtorch's spinning
//!   workers for the cores; without that runtime it runs on the calling
//!   thread.
//! - When it applies ([`linear`] and [`int8_linear`] return `None`
//!   otherwise and the caller uses libtorch): CPU tensors, one row (`x`'s
//!   leading dimensions multiply to 1), bf16 activations, contiguous
//!   weights, an x86-64 CPU with AVX2 and FMA, and no gradient to record
//!   (grad mode off, or nothing requiring a gradient).

use std::ffi::c_void;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Below this many weights a call is not split over threads (the team's
/// start-up would cost more than it saves).
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// `y = x Wᵀ (+ b)` for one bf16 row `x: [.., K]` and `weight: [N, K]`
/// bf16, `bias: [N]` (any float dtype): `[.., N]` bf16, or `None` where the
/// module doc's conditions do not hold.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    if weight.kind() != Kind::BFloat16 {
        return None;
    }
    applicable(x, weight, bias)?;
    Some(run(x, weight, bias, None))
}

/// `y_n = s_n · Σ_k q_nk x_k (+ b_n)` for one bf16 row `x: [.., K]`, int8
/// `values: [N, K]` and `scales: [N]` (any float dtype): `[.., N]` bf16, or
/// `None` where the module doc's conditions do not hold.
pub fn int8_linear(
    x: &Tensor,
    values: &Tensor,
    scales: &Tensor,
    bias: Option<&Tensor>,
) -> Option<Tensor> {
    if values.kind() != Kind::Int8 || scales.numel() != values.size().first().copied()? as usize {
        return None;
    }
    applicable(x, values, bias)?;
    Some(run(x, values, bias, Some(scales)))
}

/// `Some` when the kernel applies to `x` and `weight`.
fn applicable(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<()> {
    if !cpu_has_avx2_fma()
        || x.device() != Device::Cpu
        || weight.device() != Device::Cpu
        || x.kind() != Kind::BFloat16
        || weight.dim() != 2
        || !weight.is_contiguous()
    {
        return None;
    }
    let (n, k) = (weight.size()[0] as usize, weight.size()[1] as usize);
    if x.size().last().copied() != Some(k as i64) || x.numel() != k || n == 0 {
        return None;
    }
    if bias.is_some_and(|b| b.numel() != n || b.device() != Device::Cpu) {
        return None;
    }
    let tracked =
        x.requires_grad() || weight.requires_grad() || bias.is_some_and(Tensor::requires_grad);
    if tracked && grad_enabled() {
        return None;
    }
    Some(())
}

/// Whether autograd records operations on this thread now.
fn grad_enabled() -> bool {
    // SAFETY: sets the thread-local grad mode and restores it at once.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// Whether this module's kernels run on this machine (AVX2 and FMA, and
/// libtorch not told to take another CPU's paths): where not, every
/// function here declines and callers compute with libtorch.
pub fn available() -> bool {
    cpu_has_avx2_fma()
}

/// Whether the AVX2 kernels run: the CPU has AVX2 and FMA, and libtorch
/// was not told to take another CPU's paths (`ATEN_CPU_CAPABILITY=default`
/// simulates a CPU without AVX2 for libtorch and for this module alike).
fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            let capability = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default();
            !matches!(
                capability.to_ascii_lowercase().as_str(),
                "default" | "sse" | "sse4"
            ) && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One product of a [`gemv_batch`]: `y = W x` for a CPU `weight: [N, K]`,
/// contiguous, bf16 or int8 (an int8 `W`'s row scales are the caller's to
/// apply), `x: [K]`, `y: [N]` (overwritten).
pub struct Product<'a> {
    /// `[N, K]`, row-major.
    pub weight: &'a Tensor,
    /// `K` inputs.
    pub x: &'a [f32],
    /// `N` outputs.
    pub y: &'a mut [f32],
}

/// Runs `products` in one parallel region of libtorch's OpenMP team (each
/// thread takes its share of every product's rows), or returns `false`
/// without computing anything where the kernel does not apply to one of
/// them (see the module doc; the shapes must match). For several small
/// products (a token's experts) one region instead of one per product
/// saves the team's start-ups and evens out the threads' shares.
pub fn gemv_batch(products: &mut [Product<'_>]) -> bool {
    let fits = |p: &Product<'_>| {
        let w = p.weight;
        w.device() == Device::Cpu
            && w.dim() == 2
            && w.is_contiguous()
            && w.size() == [p.y.len() as i64, p.x.len() as i64]
            && matches!(w.kind(), Kind::BFloat16 | Kind::Int8)
    };
    if !cpu_has_avx2_fma() || !products.iter().all(fits) {
        return false;
    }
    if products.iter().any(|p| p.weight.requires_grad()) && grad_enabled() {
        return false;
    }
    let segments: Vec<Segment> = products
        .iter_mut()
        .map(|p| Segment {
            weights: match p.weight.kind() {
                Kind::Int8 => Weights::Int8(p.weight.data_ptr() as *const i8),
                _ => Weights::Bf16(p.weight.data_ptr() as *const u16),
            },
            x: p.x.as_ptr(),
            y: p.y.as_mut_ptr(),
            n: p.y.len(),
            k: p.x.len(),
        })
        .collect();
    let weights: usize = segments.iter().map(|s| s.n * s.k).sum();
    let threads = if weights >= PARALLEL_MIN_WEIGHTS {
        tch::get_num_threads().max(1) as usize
    } else {
        1
    };
    let job = Job { segments, threads };
    match (threads > 1).then(omp).flatten() {
        // SAFETY: `job` and the products it points into outlive the call,
        // which returns when every thread of the team has finished; the
        // threads write disjoint rows.
        Some(omp) => unsafe {
            (omp.parallel)(
                team_member,
                &job as *const Job as *mut c_void,
                threads as u32,
                0,
            )
        },
        // SAFETY: one thread, every row.
        None => unsafe { job.run_share(0, 1) },
    }
    true
}

#[derive(Clone, Copy)]
enum Weights {
    Bf16(*const u16),
    Int8(*const i8),
}

/// One product's operands as pointers.
struct Segment {
    weights: Weights,
    x: *const f32,
    y: *mut f32,
    n: usize,
    k: usize,
}

/// A batch's segments, shared read-only by the team (rows disjoint).
struct Job {
    segments: Vec<Segment>,
    threads: usize,
}

impl Job {
    /// Thread `id`'s rows of every segment: a block of a multiple of 4.
    ///
    /// # Safety
    /// Each segment's pointers hold `n * k` weights, `k` inputs and `n`
    /// outputs.
    unsafe fn run_share(&self, id: usize, threads: usize) {
        for s in &self.segments {
            let chunk = s.n.div_ceil(threads).div_ceil(4) * 4;
            let start = (id * chunk).min(s.n);
            let end = ((id + 1) * chunk).min(s.n);
            // Four rows at once share each load of `x` and read four
            // streams of pages; rows shorter than a 4 KiB page are read
            // one at a time instead, a single sequential stream (four
            // 2 KiB rows at once, two streams within each page, streamed
            // about a third slower on the development machine).
            #[cfg(target_arch = "x86_64")]
            match s.weights {
                Weights::Bf16(w) if 2 * s.k >= 4096 => {
                    avx2::rows::<avx2::Bf16>(w, s.x, s.y, s.k, start, end)
                }
                Weights::Bf16(w) => avx2::row_by_row::<avx2::Bf16>(w, s.x, s.y, s.k, start, end),
                Weights::Int8(w) if s.k >= 4096 => {
                    avx2::rows::<avx2::Int8>(w, s.x, s.y, s.k, start, end)
                }
                Weights::Int8(w) => avx2::row_by_row::<avx2::Int8>(w, s.x, s.y, s.k, start, end),
            }
        }
    }
}

/// `x` (one row, any float dtype) as f32 values.
pub fn row_f32(x: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(x.reshape([-1]).to_kind(Kind::Float)).unwrap_or_default()
}

/// f32 values as a bf16 CPU tensor of `shape` (rounded to nearest even).
pub fn bf16_tensor(values: &[f32], shape: &[i64]) -> Tensor {
    let bits: Vec<u16> = values.iter().map(|&v| bf16_bits(v)).collect();
    // SAFETY: `bits` holds the shape's bf16 values; `copy` owns a copy.
    unsafe {
        Tensor::from_blob(
            bits.as_ptr() as *const u8,
            shape,
            &[],
            Kind::BFloat16,
            Device::Cpu,
        )
        .copy()
    }
}

fn run(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, scales: Option<&Tensor>) -> Tensor {
    let x32 = row_f32(x);
    let mut y = vec![0f32; weight.size()[0] as usize];
    let computed = gemv_batch(&mut [Product {
        weight,
        x: &x32,
        y: &mut y,
    }]);
    debug_assert!(computed, "checked by `applicable`");
    if let Some(scales) = scales {
        y.iter_mut().zip(row_f32(scales)).for_each(|(y, s)| *y *= s);
    }
    if let Some(bias) = bias {
        y.iter_mut().zip(row_f32(bias)).for_each(|(y, b)| *y += b);
    }
    let mut shape = x.size();
    *shape.last_mut().expect("x has a last dimension") = y.len() as i64;
    bf16_tensor(&y, &shape)
}

/// f32 to bf16 bits, round to nearest even (NaN stays a quiet NaN).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The OpenMP entry points of the runtime libtorch loaded.
struct Omp {
    parallel: unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32),
    thread_num: unsafe extern "C" fn() -> i32,
}

fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        // SAFETY: dlsym on the process's global scope; the signatures are
        // libgomp's ABI (`GOMP_parallel(fn, data, num_threads, flags)`).
        unsafe {
            let parallel = libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr());
            let thread_num = libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_thread_num".as_ptr());
            (!parallel.is_null() && !thread_num.is_null()).then(|| Omp {
                parallel: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32),
                >(parallel),
                thread_num: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> i32>(
                    thread_num,
                ),
            })
        }
    })
    .as_ref()
}

extern "C" fn team_member(data: *mut c_void) {
    // SAFETY: `data` is the `Job` of `gemv_batch`, alive for the whole team.
    unsafe {
        let job = &*(data as *const Job);
        let id = omp().map_or(0, |omp| (omp.thread_num)()).max(0) as usize;
        job.run_share(id, job.threads);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// A weight element type: 8 of them widened to f32 lanes.
    pub trait Element: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    #[derive(Clone, Copy)]
    pub struct Bf16(());
    #[derive(Clone, Copy)]
    pub struct Int8(());

    impl Element for u16 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(p: *const u16) -> __m256 {
            let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
        }
        fn to_f32(self) -> f32 {
            f32::from_bits((self as u32) << 16)
        }
    }

    impl Element for i8 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
        fn to_f32(self) -> f32 {
            self as f32
        }
    }

    /// Maps the marker types of the caller to element types.
    pub trait Kind {
        type E: Element;
    }
    impl Kind for Bf16 {
        type E = u16;
    }
    impl Kind for Int8 {
        type E = i8;
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    }

    /// `y[r] = Σ_k w[r, k] x[k]` for rows `start..end`, one at a time with
    /// four accumulators (one sequential stream).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_by_row<K: Kind>(
        w: *const K::E,
        x: *const f32,
        y: *mut f32,
        k: usize,
        start: usize,
        end: usize,
    ) {
        let body = k / 32 * 32;
        for r in start..end {
            let row = w.add(r * k);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let at = i + 8 * j;
                    *acc =
                        _mm256_fmadd_ps(K::E::load8(row.add(at)), _mm256_loadu_ps(x.add(at)), *acc);
                }
                i += 32;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let tail: f32 = (body..k).map(|i| (*row.add(i)).to_f32() * *x.add(i)).sum();
            *y.add(r) = hsum(sum) + tail;
        }
    }

    /// `y[r] = Σ_k w[r, k] x[k]` for rows `start..end`, four at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows<K: Kind>(
        w: *const K::E,
        x: *const f32,
        y: *mut f32,
        k: usize,
        start: usize,
        end: usize,
    ) {
        let body = k / 8 * 8;
        let tail = |row: *const K::E| -> f32 {
            (body..k).map(|i| (*row.add(i)).to_f32() * *x.add(i)).sum()
        };
        let mut r = start;
        while r + 4 <= end {
            let rows = [0, 1, 2, 3].map(|j| w.add((r + j) * k));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                let xv = _mm256_loadu_ps(x.add(i));
                for j in 0..4 {
                    acc[j] = _mm256_fmadd_ps(K::E::load8(rows[j].add(i)), xv, acc[j]);
                }
                i += 8;
            }
            for j in 0..4 {
                *y.add(r + j) = hsum(acc[j]) + tail(rows[j]);
            }
            r += 4;
        }
        while r < end {
            let row = w.add(r * k);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < body {
                acc = _mm256_fmadd_ps(K::E::load8(row.add(i)), _mm256_loadu_ps(x.add(i)), acc);
                i += 8;
            }
            *y.add(r) = hsum(acc) + tail(row);
            r += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `|ours − exact| ≤ 2⁻⁸|exact| + 2·K·2⁻²⁴·magnitude`: bf16's rounding of
    /// the result (half an ulp, 2⁻⁹ relative, with room for the reference's
    /// own rounding) plus two f32 sums of K terms (ours and libtorch's
    /// reference), each within K·2⁻²⁴·Σ|w x| (`magnitude`).
    fn assert_within(ours: &Tensor, exact: &Tensor, magnitude: &Tensor, k: i64, what: &str) {
        let bound = exact.abs() * 2f64.powi(-8) + magnitude * (2.0 * k as f64 * 2f64.powi(-24));
        let diff = (ours.to_kind(Kind::Float) - exact).abs();
        let excess = (diff - bound).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{what}: the difference exceeds the bound by {excess}"
        );
    }

    /// The kernel against libtorch's f32 product of the same bf16 values:
    /// both sum K products exactly representable in f32, so they differ by
    /// f32 summation order (≤ K·2⁻²⁴·Σ|w x|) before the final bf16 rounding,
    /// which can then differ by one bf16 ulp of the result.
    #[test]
    fn bf16_and_int8_rows_match_libtorch() {
        let _guard = tch::no_grad_guard();
        for (n, k) in [(1, 8), (7, 19), (64, 2048), (300, 1000), (9, 4100)] {
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let x = Tensor::randn([1, 1, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let b = Tensor::randn([n], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let Some(ours) = linear(&x, &w, Some(&b)) else {
                assert!(!cpu_has_avx2_fma(), "applies on an AVX2 CPU");
                return;
            };
            assert_eq!(ours.size(), vec![1, 1, n]);
            let (xf, wf) = (x.to_kind(Kind::Float), w.to_kind(Kind::Float));
            let exact = xf.linear(&wf, Some(&b.to_kind(Kind::Float)));
            let magnitude = xf
                .abs()
                .linear(&wf.abs(), Some(&b.to_kind(Kind::Float).abs()));
            assert_within(&ours, &exact, &magnitude, k, &format!("{n}x{k}"));

            let q = Tensor::randint_low(-127, 128, [n, k], (Kind::Int8, Device::Cpu));
            let s = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 0.01;
            let ours = int8_linear(&x, &q, &s, None).expect("applies");
            let qf = q.to_kind(Kind::Float);
            let exact = xf.linear::<Tensor>(&qf, None) * &s;
            let magnitude = xf.abs().linear::<Tensor>(&qf.abs(), None) * &s;
            assert_within(&ours, &exact, &magnitude, k, &format!("int8 {n}x{k}"));
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let w = Tensor::randn([4, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        assert!(linear(&x, &w, None).is_none(), "two rows");
        let x1 = x.narrow(0, 0, 1);
        assert!(
            linear(&x1.to_kind(Kind::Float), &w, None).is_none(),
            "f32 input"
        );
        let square = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        assert!(
            linear(&x1, &square.tr(), None).is_none(),
            "a transposed weight"
        );
        let tracked = w.set_requires_grad(true);
        assert!(
            linear(&x1, &tracked, None).is_none(),
            "grad mode on, weight tracked"
        );
        let _guard = tch::no_grad_guard();
        assert_eq!(linear(&x1, &tracked, None).is_some(), cpu_has_avx2_fma());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p moe-layers-core --lib gemv_streaming -- --ignored --nocapture`:
    /// GB/s of bf16 GEMVs streaming through 1 GiB (no cache reuse), ours
    /// and libtorch's, for rows of 2 KiB (`2048 x 1024`, an expert's output
    /// projection in OLMoE-1B-7B) and 4 KiB (`1024 x 2048`, its input ones).
    #[test]
    #[ignore]
    fn gemv_streaming() {
        let _guard = tch::no_grad_guard();
        tch::set_num_threads(2);
        for (n, k) in [(2048i64, 1024i64), (1024, 2048)] {
            streaming(n, k);
        }
    }

    fn streaming(n: i64, k: i64) {
        let count = (1i64 << 30) / (2 * n * k);
        let w = Tensor::randn([count, n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let mats: Vec<Tensor> = (0..count).map(|i| w.get(i)).collect();
        let x = Tensor::randn([1, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        for round in 0..3 {
            let t = std::time::Instant::now();
            for m in &mats {
                let _ = linear(&x, m, None).unwrap();
            }
            let s = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for m in &mats {
                let _ = x.linear::<Tensor>(m, None);
            }
            let torch = t.elapsed().as_secs_f64();
            let gb = (count * n * k * 2) as f64 / 1e9;
            println!(
                "{n}x{k}, round {round}: ours {:.3} ms/GEMV {:.1} GB/s; libtorch {:.3} ms {:.1} GB/s",
                1e3 * s / count as f64,
                gb / s,
                1e3 * torch / count as f64,
                gb / torch
            );
        }
    }
}
