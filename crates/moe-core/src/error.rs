use std::path::PathBuf;

/// Everything a user of the library can get wrong, with a message that says
/// what was wrong and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoeError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A tensor has the wrong number of dimensions or the wrong size.
    #[error("wrong shape for {what}: expected {expected}, got {got:?}")]
    Shape {
        /// The tensor or argument checked.
        what: String,
        /// The shape that was expected, in words or as a list.
        expected: String,
        /// The shape that was given.
        got: Vec<i64>,
    },

    /// A tensor has the wrong element type.
    #[error("wrong dtype for {what}: expected {expected}, got {got:?}")]
    Kind {
        /// The tensor checked.
        what: String,
        /// The dtypes accepted.
        expected: String,
        /// The dtype given.
        got: tch::Kind,
    },

    /// A tensor lives on another device than the module's parameters.
    #[error("wrong device for {what}: expected {expected:?}, got {got:?}")]
    Device {
        /// The tensor checked.
        what: String,
        /// The device of the module's parameters.
        expected: tch::Device,
        /// The device of the tensor given.
        got: tch::Device,
    },

    /// A device was asked for that this machine or build cannot provide.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// A token id is not in `0..vocab_size`.
    #[error("token id {id} is outside the vocabulary (expected 0 <= id < {vocab_size})")]
    TokenOutOfVocab {
        /// The offending id.
        id: i64,
        /// The vocabulary size.
        vocab_size: i64,
    },

    /// A character or string cannot be encoded by the tokenizer.
    #[error("cannot encode {0}")]
    Encode(String),

    /// A sequence is longer than the model's context window.
    #[error("sequence of length {len} is longer than the context (block_size = {block_size})")]
    SequenceTooLong {
        /// Its length.
        len: i64,
        /// The longest the model takes.
        block_size: i64,
    },

    /// The training data cannot be used.
    #[error("data error: {0}")]
    Data(String),

    /// A checkpoint is missing, truncated, corrupt or does not match the config.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint's file or folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },

    /// Training diverged.
    #[error("training diverged: {0}")]
    Diverged(String),

    /// A model computed NaN or infinite values where finite ones are needed
    /// (logits to sample from): a corrupt checkpoint or an overflow.
    #[error("non-finite values: {0}")]
    NonFinite(String),

    /// A process group could not be formed or a collective failed: a bad
    /// launch environment, a peer that died or did not join within the
    /// timeout, mismatched exchanges.
    #[error("distributed: {0}")]
    Distributed(String),

    /// An MLflow tracking server could not be reached, or answered with an
    /// error: `url` is the request's, `message` says what went wrong (the
    /// server's `error_code` and message when it sent them).
    #[error("MLflow at {url}: {message}")]
    Mlflow {
        /// The request's URL.
        url: String,
        /// What went wrong.
        message: String,
    },

    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl MoeError {
    /// Shorthand for [`MoeError::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        MoeError::Config(msg.into())
    }

    /// Shorthand for [`MoeError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MoeError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`MoeError`].
pub type Result<T, E = MoeError> = std::result::Result<T, E>;
