//! The trainer's one error type.
//!
//! Every variant renders as a single line that names what is at fault (a file, a config key, a
//! value), so the command line can print it as is. [`Error::is_bad_input`] separates the user's
//! mistakes (exit status 2) from failures of the run itself.

use std::path::{Path, PathBuf};

/// Anything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file is missing, is not valid TOML, or does not deserialize.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A setting deserialized but its value is out of range or inconsistent.
    #[error("{key}: {message}")]
    Setting { key: String, message: String },

    /// A dataset file is missing or malformed.
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },

    /// The model does not fit the data (input size, class count).
    #[error("model: {0}")]
    Model(String),

    /// The run folder cannot be used (exists already, holds no run, ...).
    #[error("{path}: {message}")]
    RunDir { path: PathBuf, message: String },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Saving or loading weights failed.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },

    /// A checkpoint is corrupt, truncated, of another format version, or does not fit the run.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// Resuming with settings that would change the run.
    #[error("cannot resume: {key} was {before} in the run, {after} now")]
    ResumeMismatch {
        key: String,
        before: String,
        after: String,
    },

    /// The run was interrupted (Ctrl-C) and saved a checkpoint.
    #[error(
        "interrupted after step {step}; checkpoint saved. Resume with: allcores train CONFIG --out {run_dir} --resume"
    )]
    Interrupted { step: u64, run_dir: PathBuf },

    /// The loss, a gradient or a weight became NaN or infinite. No checkpoint holds it.
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: u64, what: String },
}

impl Error {
    /// True when the user can fix it by changing the input (config, data, arguments):
    /// the command line exits with status 2 for these.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            Error::Io { .. } | Error::Diverged { .. } | Error::Interrupted { .. }
        )
    }

    pub(crate) fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Setting {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn data(path: &Path, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The trainer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
