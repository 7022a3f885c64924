//! What the lab's end-to-end tests share.

use std::process::Output;

/// The stdout of a program run that must have exited successfully; the
/// failure message holds both of its streams.
pub fn ok(out: &Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout.into_owned()
}
