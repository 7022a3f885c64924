//! Named-tensor files (safetensors) read and written as a whole: written to
//! a temporary name and renamed, read back only when every expected tensor
//! is present with its shape and nothing else is there.

use moe_core::{commit, temp_path, write_atomic, MoeError, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// Writes `named` to `path` atomically ([`moe_core::commit`]: synced to
/// disk before the rename): a crash or power loss never leaves an empty or
/// half-written file under the final name, and the previous file stays until
/// the rename.
pub(crate) fn write_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let tmp = temp_path(path);
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&refs, &tmp).map_err(|e| file_err(&tmp, e))?;
    commit(&tmp, path)
}

/// Writes `bytes` to `path` atomically ([`moe_core::write_atomic`]).
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)
}

/// Reads `path` and checks it against `expected` (name and shape of every
/// tensor): a missing, truncated or corrupt file, a missing or extra tensor,
/// or a shape mismatch is a [`MoeError::Checkpoint`] naming the file and
/// listing the mismatches. `what` says what the file holds ("weights", ...).
pub(crate) fn read_tensors(
    path: &Path,
    what: &str,
    expected: &[(String, Vec<i64>)],
) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("the {what} file does not exist"),
        });
    }
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| file_err(path, e))?
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match tensors.get(name) {
            None => problems.push(format!("missing tensor `{name}`")),
            Some(t) if &t.size() != shape => problems.push(format!(
                "tensor `{name}` has shape {:?}, the config expects {shape:?}",
                t.size()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .collect();
    extra.sort();
    problems.extend(extra.iter().map(|k| format!("unexpected tensor `{k}`")));
    if problems.is_empty() {
        return Ok(tensors);
    }
    let shown = problems.len().min(5);
    Err(MoeError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!(
            "the {what} do not match the config ({} problem(s)): {}{}",
            problems.len(),
            problems[..shown].join("; "),
            if problems.len() > shown { "; ..." } else { "" }
        ),
    })
}

/// A [`MoeError::Checkpoint`] for `path`.
pub(crate) fn file_err(path: &Path, e: impl std::fmt::Display) -> MoeError {
    MoeError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
