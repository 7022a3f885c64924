//! Compiles `csrc/*.cpp` against the libtorch that `torch-sys` found.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(moe_c10d)");
    // torch-sys reports no libtorch in tch's `doc-only` mode (docs.rs): there
    // is nothing to compile against, and documentation needs no shim.
    let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!(
            "cargo:warning=torch-sys reported no libtorch (tch's doc-only mode?): \
             the C++ shim is not compiled; binaries using it will not link"
        );
        return;
    };
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    // PyPI's torch wheels (2.7 and later) are built with the C++11 ABI, as
    // is tch's own default for a plain libtorch.
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let mut sources = vec!["csrc/fused_adamw.cpp", "csrc/clear_grads.cpp"];
    // c10d's Gloo process group needs Gloo's headers, which the torch wheel
    // does not ship: `cargo xtask env` fetches them (Debian's libgloo-dev)
    // and sets MOE_GLOO_INCLUDE. Without them the distributed part is left
    // out and `moe_aten::dist` says so at run time.
    println!("cargo:rerun-if-env-changed=MOE_GLOO_INCLUDE");
    let gloo = env::var_os("MOE_GLOO_INCLUDE")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/include")))
        .filter(|dir| dir.join("gloo").join("algorithm.h").is_file());
    if gloo.is_some() {
        sources.push("csrc/c10d.cpp");
        println!("cargo:rustc-cfg=moe_c10d");
    } else {
        println!(
            "cargo:warning=Gloo's headers not found (MOE_GLOO_INCLUDE unset): building without \
             process groups; `cargo xtask env` fetches them"
        );
    }
    for source in &sources {
        println!("cargo:rerun-if-changed={source}");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(root.join("include"))
        .include(
            root.join("include")
                .join("torch")
                .join("csrc")
                .join("api")
                .join("include"),
        )
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .files(&sources);
    if let Some(dir) = gloo {
        // The torch wheel is built with Gloo; its c10d headers say so by this macro.
        build.include(dir).define("USE_C10D_GLOO", None);
        // NCCL process groups (feature `nccl`): NCCL's and the CUDA
        // runtime's headers come with the torch wheel's PyPI dependencies
        // (nvidia-nccl-cu13, nvidia-cuda-runtime) and nvidia-cuda-crt and
        // nvidia-cuda-cccl, beside torch in site-packages; the group's code
        // is in libtorch_cuda.
        if env::var_os("CARGO_FEATURE_NCCL").is_some() {
            let site = root.parent().expect("torch's folder has a parent");
            let cuda = site.join("nvidia").join("cu13").join("include");
            for dir in [
                site.join("nvidia").join("nccl").join("include"),
                cuda.join("cccl"),
                cuda.clone(),
            ] {
                assert!(
                    dir.is_dir(),
                    "feature `nccl` needs {} (the CUDA build of torch from PyPI, with \
                     nvidia-cuda-crt and nvidia-cuda-cccl: `cargo xtask` installs them when \
                     its arguments name the nccl feature)",
                    dir.display()
                );
                build.include(dir);
            }
            build.define("USE_C10D_NCCL", None);
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
    }
    build.compile("moe_aten");
}
