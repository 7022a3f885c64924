//! Compiles `csrc/*.cpp` against the libtorch that `torch-sys` found.
use std::env;
use std::path::PathBuf;

fn main() {
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    // PyPI's torch wheels (2.7 and later) are built with the C++11 ABI, as
    // is tch's own default for a plain libtorch.
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let sources = ["csrc/fused_adamw.cpp", "csrc/clear_grads.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(root.join("include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .files(sources)
        .compile("moe_aten");
}
