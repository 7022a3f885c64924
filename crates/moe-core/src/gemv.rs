//! One-token linear layers on the CPU: `y = x Wᵀ (+ b)` for a single row
//! `x` against a row-major `W: [N, K]` stored as bf16, or as int8 with one
//! scale per row (`y_n = s_n · Σ_k q_nk x_k`).
//!
//! Batch-1 decoding is bound by memory bandwidth: every weight is read once
//! per token and used for one multiply-add. What this module does, nothing
//! more: a streaming dot product per row (bf16 widened to f32 by a 16-bit
//! shift, int8 converted, fused multiply-add into f32 accumulators), four
//! rows at a time sharing each load of `x` for rows of 4 KiB and more, one
//! row at a time for shorter ones, with a software prefetch a fixed
//! distance ahead of the weights being read; at the AVX-512 width where the
//! CPU has it, AVX2 otherwise. The ignored test `gemv_streaming` prints its
//! GB/s beside libtorch's (bf16 `linear`, int8 `_weight_int8pack_mm`), 2
//! threads streaming 1 GiB:
//!
//! | machine | bf16, 2 KiB / 4 KiB rows | libtorch bf16 | int8 | libtorch int8 |
//! |---|---|---|---|---|
//! | 2 AMD EPYC cores, AVX2 (at f5e79cc: before AVX-512 and the prefetch) | 21-31 | 15.5-20 | - | - |
//! | 2 Intel Xeon cores (hyperthreads), AVX-512 | 20.6-21.1 / 21.3-21.7 | 14.3 / 18.6-18.9 | 17.1-18.0 | 10.8-13.1 |
//! | the same, `ATEN_CPU_CAPABILITY=avx2` | 16.7-17.6 / 21.7-22.0 | 15.8-16.4 / 17.0-17.8 | 16.9-18.5 | 9.1-11.5 |
//!
//! (The Xeon's libtorch f32 sum reads 22 GB/s with 2 threads, 11 with
//! one. At commit f5e79cc, before the AVX-512 width and the prefetch, the
//! same test gave its bf16 2 KiB rows 16.5-16.8 GB/s.)
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
//!   weights, an x86-64 CPU with AVX2 and FMA (AVX-512F for the wider
//!   kernels; `ATEN_CPU_CAPABILITY=avx2` keeps them at AVX2 and `default`
//!   turns the module off, as for libtorch), and no gradient to record
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
            !matches!(aten_capability().as_str(), "default" | "sse" | "sse4")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `ATEN_CPU_CAPABILITY` in lower case (empty when unset): the CPU paths
/// libtorch was told to take, which these kernels follow too.
fn aten_capability() -> String {
    std::env::var("ATEN_CPU_CAPABILITY")
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Whether the AVX-512 width of the kernels runs: the CPU has AVX-512F,
/// and libtorch was not told to take an AVX2 CPU's paths
/// (`ATEN_CPU_CAPABILITY=avx2` simulates one for both).
fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            cpu_has_avx2_fma()
                && aten_capability() != "avx2"
                && std::is_x86_feature_detected!("avx512f")
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
            #[cfg(target_arch = "x86_64")]
            if cpu_has_avx512() {
                simd::run_avx512(s, start, end)
            } else {
                simd::run_avx2(s, start, end)
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

/// The kernels, written once over the SIMD width ([`simd::Width`]): AVX2
/// (8 f32 lanes) everywhere the module applies, AVX-512 (16 lanes) where
/// the CPU has it. Widening a weight to f32 costs the same instructions per
/// vector at either width, so AVX-512 halves the instructions per weight:
/// on a core shared with another hyperthread the AVX2 int8 kernel is bound
/// by them (about 7 G weights/s a thread), not by memory.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// One SIMD width's operations on f32 lanes. Every method is
    /// `#[inline(always)]` without a target feature of its own: it is
    /// compiled inside the `#[target_feature]` entry point
    /// ([`run_avx2`], [`run_avx512`]) that instantiates the kernels.
    pub trait Width {
        /// f32 lanes in a vector.
        const LANES: usize;
        type V: Copy;
        unsafe fn zero() -> Self::V;
        unsafe fn load_x(p: *const f32) -> Self::V;
        /// `LANES` bf16 values widened to f32 (a 16-bit shift: exact).
        unsafe fn load_bf16(p: *const u16) -> Self::V;
        /// `LANES` int8 values converted to f32 (exact).
        unsafe fn load_i8(p: *const i8) -> Self::V;
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn hsum(v: Self::V) -> f32;
    }

    #[derive(Clone, Copy)]
    pub struct Avx2;
    #[derive(Clone, Copy)]
    pub struct Avx512;

    impl Width for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            _mm_cvtss_f32(_mm_hadd_ps(s, s))
        }
    }

    impl Width for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m512 {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn hsum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    /// A weight element type: loaded `LANES` at a time as f32.
    pub trait Element: Copy {
        unsafe fn load<W: Width>(p: *const Self) -> W::V;
        fn to_f32(self) -> f32;
    }

    impl Element for u16 {
        #[inline(always)]
        unsafe fn load<W: Width>(p: *const u16) -> W::V {
            W::load_bf16(p)
        }
        fn to_f32(self) -> f32 {
            f32::from_bits((self as u32) << 16)
        }
    }

    impl Element for i8 {
        #[inline(always)]
        unsafe fn load<W: Width>(p: *const i8) -> W::V {
            W::load_i8(p)
        }
        fn to_f32(self) -> f32 {
            self as f32
        }
    }

    /// How far ahead of the weights being read the kernels ask for cache
    /// lines, for 1-byte weights: 2 KiB of int8; bf16 weights ask 1 KiB
    /// ahead (this divided by their size), which streamed faster than 2.
    /// Chosen on a 2-core AVX-512 machine (each core shared with another
    /// hyperthread), where the hardware prefetcher alone did not keep up
    /// with the int8 kernel; the ignored test `gemv_streaming` prints the
    /// rates.
    const PREFETCH_BYTES: usize = 2048;

    /// Asks for the cache lines `PREFETCH_BYTES / size` bytes past `p`, as
    /// many as one loop step of the widest width reads (64 weights); a
    /// prefetch past the end of the weights does nothing.
    #[inline(always)]
    unsafe fn prefetch_ahead<E: Element>(p: *const E) {
        let size = std::mem::size_of::<E>();
        let bytes = 64 * size;
        let at = (p as *const i8).wrapping_add(PREFETCH_BYTES / size);
        for line in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line));
        }
    }

    /// `y[r] = Σ_k w[r, k] x[k]` for rows `start..end`, one at a time with
    /// four accumulators (one sequential stream).
    #[inline(always)]
    pub unsafe fn row_by_row<W: Width, E: Element>(
        w: *const E,
        x: *const f32,
        y: *mut f32,
        k: usize,
        start: usize,
        end: usize,
    ) {
        let step = 4 * W::LANES;
        let body = k / step * step;
        for r in start..end {
            let row = w.add(r * k);
            let mut acc = [W::zero(); 4];
            let mut i = 0;
            while i < body {
                prefetch_ahead(row.add(i));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let at = i + W::LANES * j;
                    *acc = W::fmadd(E::load::<W>(row.add(at)), W::load_x(x.add(at)), *acc);
                }
                i += step;
            }
            let sum = W::add(W::add(acc[0], acc[1]), W::add(acc[2], acc[3]));
            let tail: f32 = (body..k).map(|i| (*row.add(i)).to_f32() * *x.add(i)).sum();
            *y.add(r) = W::hsum(sum) + tail;
        }
    }

    /// `y[r] = Σ_k w[r, k] x[k]` for rows `start..end`, four at a time.
    #[inline(always)]
    pub unsafe fn rows<W: Width, E: Element>(
        w: *const E,
        x: *const f32,
        y: *mut f32,
        k: usize,
        start: usize,
        end: usize,
    ) {
        let body = k / W::LANES * W::LANES;
        let tail =
            |row: *const E| -> f32 { (body..k).map(|i| (*row.add(i)).to_f32() * *x.add(i)).sum() };
        let mut r = start;
        while r + 4 <= end {
            let rows = [0, 1, 2, 3].map(|j| w.add((r + j) * k));
            let mut acc = [W::zero(); 4];
            let mut i = 0;
            while i < body {
                if i % (4 * W::LANES) == 0 {
                    rows.iter().for_each(|&row| prefetch_ahead(row.add(i)));
                }
                let xv = W::load_x(x.add(i));
                for j in 0..4 {
                    acc[j] = W::fmadd(E::load::<W>(rows[j].add(i)), xv, acc[j]);
                }
                i += W::LANES;
            }
            for j in 0..4 {
                *y.add(r + j) = W::hsum(acc[j]) + tail(rows[j]);
            }
            r += 4;
        }
        while r < end {
            let row = w.add(r * k);
            let mut acc = W::zero();
            let mut i = 0;
            while i < body {
                acc = W::fmadd(E::load::<W>(row.add(i)), W::load_x(x.add(i)), acc);
                i += W::LANES;
            }
            *y.add(r) = W::hsum(acc) + tail(row);
            r += 1;
        }
    }

    /// Rows `start..end` of one product at width `W`: four rows at a time
    /// sharing each load of `x` for rows of 4 KiB and more, one row at a
    /// time for shorter ones (a single sequential stream: four 2 KiB rows
    /// at once, two streams within each page, streamed about a third
    /// slower on an AVX2 development machine).
    #[inline(always)]
    unsafe fn product<W: Width>(s: &super::Segment, start: usize, end: usize) {
        match s.weights {
            super::Weights::Bf16(w) if 2 * s.k >= 4096 => {
                rows::<W, u16>(w, s.x, s.y, s.k, start, end)
            }
            super::Weights::Bf16(w) => row_by_row::<W, u16>(w, s.x, s.y, s.k, start, end),
            super::Weights::Int8(w) if s.k >= 4096 => rows::<W, i8>(w, s.x, s.y, s.k, start, end),
            super::Weights::Int8(w) => row_by_row::<W, i8>(w, s.x, s.y, s.k, start, end),
        }
    }

    /// [`product`] with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run_avx2(s: &super::Segment, start: usize, end: usize) {
        product::<Avx2>(s, start, end)
    }

    /// [`product`] with AVX-512 (foundation).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run_avx512(s: &super::Segment, start: usize, end: usize) {
        product::<Avx512>(s, start, end)
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
    /// GB/s of one-row GEMVs streaming through 1 GiB (no cache reuse),
    /// ours and libtorch's, for rows of 2 KiB (`2048 x 1024`, an expert's
    /// output projection in OLMoE-1B-7B) and 4 KiB (`1024 x 2048`, its
    /// input ones) in bf16, then the same shapes in int8. 2 threads, or
    /// `GEMV_THREADS`.
    #[test]
    #[ignore]
    fn gemv_streaming() {
        let _guard = tch::no_grad_guard();
        let threads = std::env::var("GEMV_THREADS").map_or(2, |t| t.parse().unwrap());
        tch::set_num_threads(threads);
        for (n, k) in [(2048i64, 1024i64), (1024, 2048)] {
            streaming(n, k);
        }
        for (n, k) in [(2048i64, 1024i64), (1024, 2048)] {
            int8_streaming(n, k);
        }
    }

    /// GB/s of int8 GEMVs through [`gemv_batch`], eight products a batch
    /// (a token's experts), streaming through 1 GiB; libtorch's
    /// `_weight_int8pack_mm` beside it.
    fn int8_streaming(n: i64, k: i64) {
        let count = (1i64 << 30) / (n * k) / 8 * 8;
        let w = Tensor::randint_low(-127, 128, [count, n, k], (Kind::Int8, Device::Cpu));
        let mats: Vec<Tensor> = (0..count).map(|i| w.get(i)).collect();
        let scales = Tensor::ones([n], (Kind::BFloat16, Device::Cpu));
        let xt = Tensor::randn([1, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let x = row_f32(&xt);
        let mut ys = vec![vec![0f32; n as usize]; 8];
        for round in 0..3 {
            let t = std::time::Instant::now();
            for batch in mats.chunks(8) {
                let mut products: Vec<Product<'_>> = batch
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(weight, y)| Product { weight, x: &x, y })
                    .collect();
                assert!(gemv_batch(&mut products));
            }
            let s = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for m in &mats {
                let _ = xt.internal_weight_int8pack_mm(m, &scales);
            }
            let torch = t.elapsed().as_secs_f64();
            let gb = (count * n * k) as f64 / 1e9;
            println!(
                "int8 {n}x{k}, round {round}: ours {:.3} ms/GEMV {:.1} GB/s; libtorch int8pack_mm {:.3} ms {:.1} GB/s",
                1e3 * s / count as f64,
                gb / s,
                1e3 * torch / count as f64,
                gb / torch
            );
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
