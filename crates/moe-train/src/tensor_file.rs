//! Named-tensor files (safetensors) read and written as a whole: written to
//! a temporary name and renamed, read back only when every expected tensor
//! is present with its shape and nothing else is there.

use moe_core::{safetensors_dtype, write_atomic, write_safetensors, MoeError, Result};
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Tensor};

/// Writes `named` to `path` as safetensors with `__metadata__ {"format":
/// "pt"}` (what PyTorch's `safetensors.torch.save_file` writes, and what
/// transformers checks before loading), atomically ([`moe_core::commit`]:
/// synced to disk before the rename): a crash or power loss never leaves an
/// empty or half-written file under the final name, and the previous file
/// stays until the rename.
pub(crate) fn write_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let mut stored = Vec::with_capacity(named.len());
    for (name, tensor) in named {
        let tensor = tensor.to_device(Device::Cpu).contiguous();
        let dtype = safetensors_dtype(tensor.kind()).ok_or_else(|| {
            file_err(
                path,
                format!(
                    "cannot store tensor `{name}` of kind {:?}: expected a float, integer or \
                     bool kind",
                    tensor.kind()
                ),
            )
        })?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor
            .f_copy_data_u8(&mut bytes, numel)
            .map_err(|e| file_err(path, e))?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        stored.push((name.as_str(), dtype, shape, bytes));
    }
    let views = stored
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|view| (*name, view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    write_safetensors(path, views, || None)
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
