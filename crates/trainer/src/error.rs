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

    /// The run was interrupted (Ctrl-C, SIGTERM, SIGHUP) and saved a checkpoint in its run
    /// folder (`None`: a run that writes no folder, which saved nothing).
    #[error("interrupted after step {step}; {}", interrupted_note(run_dir.as_deref()))]
    Interrupted { step: u64, run_dir: Option<PathBuf> },

    /// The loss, a gradient or a weight became NaN or infinite. No checkpoint holds it.
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: u64, what: String },
}

/// The command that resumes the run in `run_dir`, ready to paste into a shell. It names the
/// config the run folder keeps (every override applied), so it needs none of the `--set`s the
/// run was started with.
pub(crate) fn resume_command(run_dir: &Path) -> String {
    let config = run_dir.join(crate::run_dir::CONFIG_FILE);
    let quoted = |path: &Path| {
        let path = path.to_string_lossy();
        shlex::try_quote(&path).map_or_else(|_| format!("{path:?}"), |q| q.into_owned())
    };
    format!(
        "allcores train {} --out {} --resume",
        quoted(&config),
        quoted(run_dir)
    )
}

/// What an interrupted run kept, and how to go on from it.
fn interrupted_note(run_dir: Option<&Path>) -> String {
    match run_dir {
        Some(run_dir) => format!("checkpoint saved. Resume with: {}", resume_command(run_dir)),
        None => "no run folder, so nothing was saved".into(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The interrupted run names a command that works as pasted: the run folder's own config,
    /// and paths quoted where a shell would split them.
    #[test]
    fn an_interrupted_run_names_the_command_that_resumes_it() {
        let interrupted = |dir: &str| {
            Error::Interrupted {
                step: 7,
                run_dir: Some(PathBuf::from(dir)),
            }
            .to_string()
        };
        assert_eq!(
            interrupted("runs/cnn"),
            "interrupted after step 7; checkpoint saved. Resume with: \
             allcores train runs/cnn/config.toml --out runs/cnn --resume"
        );
        let unsaved = Error::Interrupted {
            step: 7,
            run_dir: None,
        };
        assert_eq!(
            unsaved.to_string(),
            "interrupted after step 7; no run folder, so nothing was saved"
        );
        assert!(
            interrupted("my runs/cnn")
                .ends_with("allcores train 'my runs/cnn/config.toml' --out 'my runs/cnn' --resume"),
            "{}",
            interrupted("my runs/cnn")
        );
    }
}
