//! The run folder: the settings a run used, its metrics, its summary and its final weights.
//!
//! ```text
//! RUN_DIR/config.toml      the settings, every layer applied, data paths absolute
//! RUN_DIR/metrics.jsonl    one JSON object per epoch
//! RUN_DIR/summary.json     the summary
//! RUN_DIR/model.safetensors  the final f32 weights
//! RUN_DIR/table.json       a CSV run's columns, classes and feature statistics
//! RUN_DIR/vocabulary.json  a language model's characters
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::data::csv::Table;
use crate::error::{Error, Result};
use crate::files::{ReadError, read_regular, write_atomically};
use crate::lock::{FolderLock, claim_new_folder};
use crate::settings::Settings;
use crate::summary::{EpochMetrics, Summary};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TABLE_FILE: &str = "table.json";

/// The largest table file read back: a header of a million columns fits.
const TABLE_LIMIT: u64 = 256 << 20;

/// Saves a CSV run's table into its folder.
pub fn save_table(folder: &Path, table: &Table) -> Result<()> {
    let json = serde_json::to_vec_pretty(table).expect("a table serializes");
    write_atomically(&folder.join(TABLE_FILE), &json)
}

/// A run's folder. One made by [`RunDir::create`] or [`RunDir::reopen`] holds the folder's
/// lock: no other process writes into it while this one runs.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: Option<FolderLock>,
}

impl RunDir {
    /// Creates the folder for a new run and takes its lock. An existing folder is used only
    /// while it is empty, so no earlier run is ever overwritten; with `numbered`, an existing
    /// `path` is passed over for the first free `path-2`, `path-3`... instead (the default
    /// folders, named by the second a run starts: two runs started in one second must not meet).
    pub fn create(path: &Path, numbered: bool) -> Result<Self> {
        let (path, lock) = claim_new_folder(path, numbered)?;
        Ok(Self {
            path,
            _lock: Some(lock),
        })
    }

    /// Reopens the folder of a run to resume it, with the lock taken before it was checked: its
    /// metrics file is rewritten to hold just `metrics` (the epochs the checkpoint had
    /// finished).
    pub fn reopen(path: &Path, lock: FolderLock, metrics: &[EpochMetrics]) -> Result<Self> {
        lock.record_owner(path)?;
        let run_dir = Self {
            path: path.to_path_buf(),
            _lock: Some(lock),
        };
        let mut lines = String::new();
        for m in metrics {
            lines.push_str(&serde_json::to_string(m).expect("metrics serialize"));
            lines.push('\n');
        }
        write_atomically(&run_dir.path.join(METRICS_FILE), lines.as_bytes())?;
        Ok(run_dir)
    }

    /// Opens the folder of a finished run, which must hold its config and weights.
    pub fn open(path: &Path) -> Result<Self> {
        let run_dir_error = |message: &str| Error::RunDir {
            path: path.to_path_buf(),
            message: message.into(),
        };
        if !path.is_dir() {
            return Err(run_dir_error("no such run folder"));
        }
        let (config, weights) = (path.join(CONFIG_FILE), path.join(WEIGHTS_FILE));
        for file in [&config, &weights] {
            if file.exists() && !file.is_file() {
                return Err(Error::RunDir {
                    path: file.clone(),
                    message: "is not a regular file: the folder holds no run to read".into(),
                });
            }
        }
        if !config.is_file() {
            return Err(run_dir_error(&format!(
                "holds no run: {CONFIG_FILE} is missing"
            )));
        }
        if !weights.is_file() {
            // A run that stopped early (Ctrl-C, a crash) has its config but not yet its weights.
            return Err(run_dir_error(&format!(
                "holds an unfinished run ({WEIGHTS_FILE} is written at its end); resume it \
                 with: {}",
                crate::error::resume_command(path)
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: None,
        })
    }

    /// Whether the folder holds a finished run: its final weights or its summary.
    pub fn is_finished(path: &Path) -> bool {
        path.join(WEIGHTS_FILE).exists() || path.join(SUMMARY_FILE).exists()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }

    pub fn weights_path(&self) -> PathBuf {
        self.path.join(WEIGHTS_FILE)
    }

    /// The table of a CSV run; `None` for a run of other data, or one from a build that saved
    /// none (read as it was trained: numeric labels, features as they are).
    pub fn table(&self) -> Result<Option<Table>> {
        let path = self.path.join(TABLE_FILE);
        let corrupt = |message: String| Error::RunDir {
            path: path.clone(),
            message,
        };
        let bytes = match read_regular(&path, Some(TABLE_LIMIT)) {
            Ok(bytes) => bytes,
            Err(ReadError::NotFound) => return Ok(None),
            Err(e) => return Err(corrupt(format!("cannot read: {e}"))),
        };
        let table: Table =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("corrupt table: {e}")))?;
        if !table.is_consistent() {
            return Err(corrupt(
                "corrupt table: its columns, classes and statistics do not agree".into(),
            ));
        }
        Ok(Some(table))
    }

    pub fn write_settings(&self, settings: &Settings) -> Result<()> {
        write_atomically(&self.config_path(), settings.to_toml().as_bytes())
    }

    pub fn append_metrics(&self, metrics: &EpochMetrics) -> Result<()> {
        let path = self.path.join(METRICS_FILE);
        let line = serde_json::to_string(metrics).expect("metrics serialize");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{line}"))
            .map_err(|e| Error::io(&path, e))
    }

    pub fn write_summary(&self, summary: &Summary) -> Result<()> {
        let text = serde_json::to_string_pretty(summary).expect("summary serializes");
        write_atomically(&self.path.join(SUMMARY_FILE), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_reuse_a_folder_that_holds_files() {
        let dir = tempfile::tempdir().unwrap();
        drop(RunDir::create(dir.path(), false).unwrap());
        std::fs::write(dir.path().join("x"), "").unwrap();
        let err = RunDir::create(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert!(dir.path().join("x").exists());
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = RunDir::create(&file.join("run"), false).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        assert!(
            err.to_string().contains("cannot create the folder"),
            "{err}"
        );
    }

    #[test]
    fn open_needs_config_and_weights() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunDir::open(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such run folder"), "{err}");
        let err = RunDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("holds no run: config.toml is missing"),
            "{err}"
        );
        std::fs::write(dir.path().join(CONFIG_FILE), "").unwrap();
        let err = RunDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds an unfinished run"), "{err}");
        assert!(err.contains("config.toml --out"), "{err}");
        std::fs::create_dir(dir.path().join(WEIGHTS_FILE)).unwrap();
        let err = RunDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors: is not a regular file"),
            "{err}"
        );
    }

    /// Default folders are named by the second: runs started in the same one each get their
    /// own, and a run started while another holds a folder is refused, naming it.
    #[test]
    fn numbered_folders_never_collide_and_a_held_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("runs").join("mlp-1700000000");
        let first = RunDir::create(&base, true).unwrap();
        let second = RunDir::create(&base, true).unwrap();
        let third = RunDir::create(&base, true).unwrap();
        assert_eq!(first.path(), base);
        assert_eq!(
            second.path(),
            dir.path().join("runs").join("mlp-1700000000-2")
        );
        assert_eq!(
            third.path(),
            dir.path().join("runs").join("mlp-1700000000-3")
        );
        let err = RunDir::create(&base, false).unwrap_err().to_string();
        assert!(
            err.contains("is in use by another allcores process (pid"),
            "{err}"
        );
        drop(first);
        // Its holder gone, the folder is free, but its owner record alone keeps nothing out.
        drop(RunDir::create(&base, false).unwrap());
    }
}
