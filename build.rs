//! Links every binary of this package (examples, tests, benches) against
//! `libtorch.so` *without* `--as-needed`.
//!
//! rustc passes `--as-needed` to the linker, which drops `libtorch_cuda.so`
//! because no Rust symbol refers to it directly; CUDA kernels then never
//! register and any CUDA tensor fails with "Could not run 'aten::empty.memory_format'
//! with arguments from the 'CUDA' backend". Forcing the libtorch libraries to
//! be needed keeps CUDA available; on a machine without a GPU the same binary
//! simply runs on the CPU.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
