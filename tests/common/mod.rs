//! Helpers shared by the end-to-end tests of the examples.

use std::path::{Path, PathBuf};

/// The plain (non-test) binary of example `name` in this test's profile
/// folder. `cargo test --all-targets` builds examples only as test harnesses,
/// so `cargo xtask test` builds the examples first (`cargo build --examples`);
/// a nested cargo build here would wait forever on the outer cargo's lock.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, or `cargo build --examples` before `cargo test`",
        path.display()
    );
    path
}
