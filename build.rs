//! Links every binary of this package (examples, tests, benches) against
//! `libtorch.so` without `--as-needed`, with a run path to it, through
//! [`moe_layers_build::link_libtorch`] (its docs say why CUDA needs this),
//! the helper that users' build scripts call too.
//!
//! It also passes libtorch's location on to the build scripts of crates
//! that depend on `moe-layers` (`links = "moe_layers"`), as
//! `DEP_MOE_LAYERS_LIBTORCH_LIB`, which that helper reads.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    match moe_layers_build::link_libtorch() {
        Ok(lib) => println!("cargo:libtorch_lib={}", lib.display()),
        // tch's doc-only mode (docs.rs) reports no libtorch: nothing to link.
        Err(e) => println!("cargo:warning={e}"),
    }
}
