//! JSON files of a checkpoint folder, written atomically
//! ([`moe_core::write_atomic`]).

use moe_core::{write_atomic, MoeError, Result};
use std::path::Path;

/// Pretty JSON of `value` with a final newline, written atomically.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| MoeError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot serialise: {e}"),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
