//! The README's "Using moe-layers in your own crate" works as written: its
//! `build.rs` and `src/main.rs` are this crate's, the program runs without
//! `LD_LIBRARY_PATH`, and its binary needs `libtorch.so` (kept by the link
//! helper against `--as-needed`, which is what makes CUDA load on a GPU
//! machine) with a run path to it.

use std::path::Path;
use std::process::Command;

const README: &str = include_str!("../../../README.md");

fn normalised(code: &str) -> String {
    code.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_readme_shows_this_crates_build_script_and_program() {
    let readme = normalised(README);
    for file in ["build.rs", "src/main.rs"] {
        let code =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        assert!(
            readme.contains(&normalised(&code)),
            "README.md does not show {file} as it is"
        );
    }
}

#[test]
fn the_program_runs_without_ld_library_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_downstream-check"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[4, 16, 64]");
}

#[test]
fn the_binary_needs_libtorch_and_has_a_run_path_to_it() {
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_downstream-check")])
        .output()
        .expect("readelf (binutils) reads the binary's dynamic section");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("Shared library: [libtorch.so]"),
        "libtorch.so is not needed (dropped by --as-needed?):\n{dynamic}"
    );
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("no run path:\n{dynamic}"));
    let dir = runpath.split('[').nth(1).unwrap().trim_end_matches(']');
    assert!(
        dir.split(':')
            .any(|d| Path::new(d).join("libtorch.so").is_file()),
        "the run path {dir} holds no libtorch.so"
    );
}
