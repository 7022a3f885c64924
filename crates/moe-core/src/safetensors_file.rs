//! Safetensors files as PyTorch's `safetensors.torch.save_file` writes them
//! (`__metadata__ {"format": "pt"}`, which transformers checks before
//! loading), written atomically: the one writer of the checkpoints of
//! `moe-train` and `moe-hf`.

use crate::{commit, temp_path, MoeError, Result};
use safetensors::tensor::{Dtype, View};
use std::collections::HashMap;
use std::path::Path;
use tch::Kind;

/// The safetensors dtype of a libtorch kind, if it has one.
pub fn safetensors_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Writes `tensors` to `path` with `__metadata__ {"format": "pt"}`:
/// into [`temp_path`]`(path)`, with the permissions of any new file (the
/// safetensors writer creates its file with mode 0600), then asks `failed`
/// whether a view failed while it was serialised (views that assemble their
/// bytes on the fly record that), then syncs and renames ([`commit`]). On
/// any failure the temporary file is removed, `path` is untouched, and the
/// error is a [`MoeError::Checkpoint`] for `path`.
pub fn write_safetensors<S, V, I>(
    path: &Path,
    tensors: I,
    failed: impl FnOnce() -> Option<String>,
) -> Result<()>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
    I: IntoIterator<Item = (S, V)>,
{
    let tmp = temp_path(path);
    let permissions = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .map_err(|e| MoeError::io(&tmp, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::set_permissions(&tmp, permissions).map_err(|e| e.to_string()))
        .and_then(|()| failed().map_or(Ok(()), Err));
    if let Err(reason) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(MoeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot write the tensors: {reason}"),
        });
    }
    commit(&tmp, path)
}
