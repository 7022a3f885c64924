//! Atomic file writes, for checkpoints: a temporary name in the same
//! folder, fsync, rename, fsync of the folder; a crash or power loss leaves
//! the old file or the new one, never an empty or half-written one.

use crate::{MoeError, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `dir/.NAME.tmp` for `dir/NAME`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` atomically: a crash leaves the old file or the
/// new one, never half of the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let mut file = File::create(&tmp).map_err(|e| MoeError::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| MoeError::io(&tmp, e))?;
    drop(file);
    commit(&tmp, path)
}

/// Flushes the finished temporary file `tmp` to disk and renames it to
/// `path`, then flushes the folder entry.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| MoeError::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| MoeError::io(path, e))?;
    if let Some(dir) = path.parent() {
        // Best effort: some platforms cannot open a folder for syncing.
        if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
