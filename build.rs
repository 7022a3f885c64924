//! Links every binary of this package (examples, tests, benches) against
//! `libtorch.so` *without* `--as-needed`.
//!
//! rustc passes `--as-needed` to the linker, which drops `libtorch_cuda.so`
//! because no Rust symbol refers to it directly; CUDA kernels then never
//! register and any CUDA tensor fails with "Could not run 'aten::empty.memory_format'
//! with arguments from the 'CUDA' backend". Forcing the libtorch libraries to
//! be needed keeps CUDA available; on a machine without a GPU the same binary
//! simply runs on the CPU.
//!
//! Each binary also gets a run path to the libtorch it was built against
//! (torch-sys reports it), so `target/release/examples/generate ...` runs
//! without `LD_LIBRARY_PATH`; a set `LD_LIBRARY_PATH` still wins (another
//! machine's torch, as the GPU bundle uses).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
