//! The link step that a program using `moe-layers` (or `tch`) needs on a GPU
//! machine, for the program's `build.rs`.
//!
//! rustc hands the linker `--as-needed`, which drops every shared library
//! that no Rust symbol refers to. Nothing in a Rust program refers to
//! `libtorch_cuda.so` directly (its CUDA kernels register themselves when the
//! library loads), so the linker drops it: the program then runs on the CPU
//! alone, and a CUDA tensor fails with "Could not run
//! 'aten::empty.memory_format' with arguments from the 'CUDA' backend".
//! [`link_libtorch`] links `libtorch.so` (which needs `libtorch_cuda.so` in a
//! CUDA build) without `--as-needed`, and gives the binaries a run path to
//! the libtorch they were built against, so that they start without
//! `LD_LIBRARY_PATH` (a set `LD_LIBRARY_PATH` still wins). On a machine
//! without a GPU the same binary runs on the CPU.
//!
//! ```no_run
//! // build.rs of a crate that depends on moe-layers
//! // ([build-dependencies] moe-layers-build = "0.1")
//! fn main() {
//!     if let Err(e) = moe_layers_build::link_libtorch() {
//!         println!("cargo:warning={e}");
//!     }
//! }
//! ```
//!
//! Where libtorch is, in this order: `DEP_MOE_LAYERS_LIBTORCH_LIB` (set by
//! `moe-layers` for crates that depend on it), `DEP_TCH_LIBTORCH_LIB` (set
//! by `torch-sys` for crates that depend on it directly), then the
//! `LIBTORCH` environment variable that `tch` also reads (`$LIBTORCH/lib`).
//! The instructions apply to the crate's own binaries, tests, examples and
//! benches.

// The example is a build script, whose `main` is the point.
#![allow(clippy::needless_doctest_main)]
#![warn(missing_docs)]

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The variables consulted, in order: the metadata `moe-layers` and
/// `torch-sys` pass to dependents' build scripts, then `LIBTORCH`.
pub const LOOKUP: [&str; 3] = [
    "DEP_MOE_LAYERS_LIBTORCH_LIB",
    "DEP_TCH_LIBTORCH_LIB",
    "LIBTORCH",
];

/// libtorch's library folder was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibtorchNotFound;

impl fmt::Display for LibtorchNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "libtorch's location is unknown: none of {} is set (depend on moe-layers or \
             torch-sys, or set LIBTORCH to a libtorch folder)",
            LOOKUP.join(", ")
        )
    }
}

impl std::error::Error for LibtorchNotFound {}

/// Finds libtorch's `lib` folder and prints the link instructions for the
/// calling build script's crate; returns the folder.
pub fn link_libtorch() -> Result<PathBuf, LibtorchNotFound> {
    for name in LOOKUP {
        println!("cargo:rerun-if-env-changed={name}");
    }
    let lib = libtorch_lib(|name| std::env::var_os(name))?;
    for line in link_instructions(&lib) {
        println!("{line}");
    }
    Ok(lib)
}

/// libtorch's `lib` folder from the variables in [`LOOKUP`], read through
/// `var` (the first one set and non-empty wins; `LIBTORCH` names the
/// libtorch folder itself, whose `lib` is taken).
pub fn libtorch_lib(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, LibtorchNotFound> {
    let set = |name: &str| var(name).filter(|value| !value.is_empty());
    if let Some(dir) = set(LOOKUP[0]).or_else(|| set(LOOKUP[1])) {
        return Ok(PathBuf::from(dir));
    }
    set(LOOKUP[2])
        .map(|root| PathBuf::from(root).join("lib"))
        .ok_or(LibtorchNotFound)
}

/// The `cargo:` lines that link `libtorch.so` from `lib` whether or not a
/// Rust symbol needs it, and add `lib` to the binaries' run path.
pub fn link_instructions(lib: &Path) -> Vec<String> {
    vec![
        format!("cargo:rustc-link-search=native={}", lib.display()),
        "cargo:rustc-link-arg=-Wl,--no-as-needed".into(),
        "cargo:rustc-link-arg=-ltorch".into(),
        "cargo:rustc-link-arg=-Wl,--as-needed".into(),
        format!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn lookup_prefers_moe_layers_then_torch_sys_then_libtorch() {
        let all = [
            ("DEP_MOE_LAYERS_LIBTORCH_LIB", "/a/lib"),
            ("DEP_TCH_LIBTORCH_LIB", "/b/lib"),
            ("LIBTORCH", "/c"),
        ];
        assert_eq!(libtorch_lib(env(&all)), Ok(PathBuf::from("/a/lib")));
        assert_eq!(libtorch_lib(env(&all[1..])), Ok(PathBuf::from("/b/lib")));
        assert_eq!(libtorch_lib(env(&all[2..])), Ok(PathBuf::from("/c/lib")));
        // An empty variable counts as unset.
        let empty = [("DEP_MOE_LAYERS_LIBTORCH_LIB", ""), ("LIBTORCH", "/c")];
        assert_eq!(libtorch_lib(env(&empty)), Ok(PathBuf::from("/c/lib")));
    }

    #[test]
    fn nothing_set_is_an_error_naming_every_variable() {
        let err = libtorch_lib(env(&[])).unwrap_err();
        let text = err.to_string();
        for name in LOOKUP {
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn libtorch_is_linked_without_as_needed_and_on_the_run_path() {
        let lines = link_instructions(Path::new("/opt/torch/lib"));
        let no_as_needed = lines
            .iter()
            .position(|l| l.ends_with("-Wl,--no-as-needed"))
            .unwrap();
        let torch = lines.iter().position(|l| l.ends_with("-ltorch")).unwrap();
        let as_needed = lines
            .iter()
            .position(|l| l.ends_with("-Wl,--as-needed"))
            .unwrap();
        assert!(no_as_needed < torch && torch < as_needed);
        assert!(lines.contains(&"cargo:rustc-link-arg=-Wl,-rpath,/opt/torch/lib".to_string()));
        assert!(lines.contains(&"cargo:rustc-link-search=native=/opt/torch/lib".to_string()));
    }
}
