use moe_core::{MoeError, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Appends one JSON object per line to a file, flushing each line so that a
/// run can be plotted while it trains.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| MoeError::io(&path, e))?;
        Ok(JsonlWriter {
            path,
            out: BufWriter::new(file),
        })
    }

    /// Opens `path` for appending (creating it if missing), e.g. when a
    /// run resumes.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| MoeError::io(&path, e))?;
        Ok(JsonlWriter {
            path,
            out: BufWriter::new(file),
        })
    }

    /// Appends `record` as one JSON line and flushes it.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record)
            .map_err(|e| MoeError::Data(format!("cannot serialise a metrics record: {e}")))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| MoeError::io(&self.path, e))
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
