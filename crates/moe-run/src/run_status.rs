//! How an MLflow run ended, for the REST client and the legacy file store.

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Ran to the end.
    Finished,
    /// Ended by an error.
    Failed,
}

impl RunStatus {
    /// MLflow's name of the status (`FINISHED`, `FAILED`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
        }
    }
}
