//! Helpers shared by the end-to-end tests of the examples.

use std::path::{Path, PathBuf};
use std::process::Output;

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

/// The stdout of a run that must have succeeded (else both streams, in the
/// failure message).
#[allow(dead_code)] // not every test binary checks a successful run
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
