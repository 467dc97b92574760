//! Deciding whether, and from where, a run can resume. Reads only: nothing in the run folder
//! changes until every check has passed.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::files::read_regular;
use crate::lock::{FolderLock, is_empty_folder};
use crate::run_dir::{CONFIG_FILE, RunDir};
use crate::settings::{CONFIG_LIMIT, Settings};

/// Settings that may change on resume: they alter speed or length, never the steps taken.
const MAY_CHANGE: [&str; 5] = [
    "training.threads",
    "training.execution",
    "training.idle_threads",
    "training.epochs",
    "training.max_steps",
];
/// Sections that may change on resume.
const MAY_CHANGE_SECTIONS: [&str; 1] = ["checkpoint."];

/// What a resume starts from: the run folder's lock, taken before anything in it was read, and
/// the checkpoint to continue from (`None` to start afresh), with lines about newer checkpoints
/// that failed to verify.
#[derive(Debug)]
pub struct Resumable {
    pub lock: FolderLock,
    pub checkpoint: Option<Checkpoint>,
    pub notes: Vec<String>,
}

/// Checks that the run in `run_dir` can go on with `settings` for `total_steps` steps. The
/// folder's saved config must match `settings` (but for the keys that may change) whether or
/// not there is a checkpoint, and a finished run is not run again: a folder that is not this
/// run's, or has nothing left to run, is refused and left as it was.
pub fn check_resumable(run_dir: &Path, settings: &Settings, total_steps: u64) -> Result<Resumable> {
    let run_dir_error = |message: &str| Error::RunDir {
        path: run_dir.to_path_buf(),
        message: message.into(),
    };
    if !run_dir.is_dir() {
        return Err(run_dir_error(
            "no such run folder to resume (drop --resume to start a new run)",
        ));
    }
    let lock = FolderLock::acquire(run_dir)?;
    let config = run_dir.join(CONFIG_FILE);
    if config.exists() {
        // As every input: a FIFO in the folder's config's place must not block the resume.
        let saved = read_regular(&config, Some(CONFIG_LIMIT)).map_err(|e| Error::RunDir {
            path: config.clone(),
            message: format!("cannot read the run's config: {e}"),
        })?;
        compare(&String::from_utf8_lossy(&saved), settings, &config)?;
    } else if !is_empty_folder(run_dir).map_err(|e| Error::io(run_dir, e))? {
        return Err(run_dir_error(&format!(
            "holds no run to resume ({CONFIG_FILE} is missing)"
        )));
    }
    let finished = RunDir::is_finished(run_dir);
    let (found, refused) = checkpoint::newest_valid(run_dir)?;
    let Some(found) = found else {
        if let Some(newest) = refused.into_iter().next() {
            // Checkpoints exist but none verifies: refuse rather than silently restart.
            return Err(Error::Checkpoint {
                path: run_dir.join(checkpoint::CHECKPOINTS_DIR),
                message: format!("no checkpoint verifies; the newest: {newest}"),
            });
        }
        if finished {
            return Err(run_dir_error(
                "holds a finished run and no checkpoint to continue it from: there is nothing \
                 to resume",
            ));
        }
        return Ok(Resumable {
            lock,
            checkpoint: None,
            notes: vec![format!(
                "{}: no checkpoint yet, starting the run afresh",
                run_dir.display()
            )],
        });
    };
    compare(&found.settings, settings, &found.folder)?;
    if finished && found.state.step >= total_steps {
        return Err(run_dir_error(&format!(
            "holds a finished run ({} steps): there is nothing to resume (raise \
             training.epochs or training.max_steps to train it further)",
            found.state.step
        )));
    }
    let notes = refused
        .into_iter()
        .map(|reason| format!("skipping a checkpoint that does not verify: {reason}"))
        .collect();
    Ok(Resumable {
        lock,
        checkpoint: Some(found),
        notes,
    })
}

/// Refuses any difference between the settings a run was written with (`saved`, read from
/// `source`) and `now`, except in the keys that may change.
fn compare(saved: &str, now: &Settings, source: &Path) -> Result<()> {
    let before = flatten(
        &toml::from_str::<toml::Table>(saved).map_err(|e| Error::RunDir {
            path: source.to_path_buf(),
            message: format!(
                "holds no allcores run config: {}",
                e.message().lines().next().unwrap_or("not TOML")
            ),
        })?,
    );
    let after = flatten(&toml::from_str::<toml::Table>(&now.to_toml()).expect("settings are TOML"));
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for key in keys {
        if MAY_CHANGE.contains(&key.as_str())
            || MAY_CHANGE_SECTIONS.iter().any(|s| key.starts_with(s))
        {
            continue;
        }
        let (was, is) = (before.get(key), after.get(key));
        if was != is {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
            return Err(Error::ResumeMismatch {
                key: key.clone(),
                before: show(was),
                after: show(is),
            });
        }
    }
    Ok(())
}

/// `{"a": {"b": 1}}` as `{"a.b": "1"}`.
fn flatten(table: &toml::Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (key, value) in table {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) => walk(&name, inner, out),
                other => {
                    out.insert(name, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        toml::from_str(&format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"a.csv\"\ntest_fraction = 0.5\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn threads_epochs_and_checkpoint_policy_may_change() {
        let saved = settings("[training]\nthreads = 1\nepochs = 2\n").to_toml();
        let now = settings(
            "[training]\nthreads = 2\nepochs = 5\nmax_steps = 9\n[checkpoint]\nkeep = 1\n",
        );
        compare(&saved, &now, Path::new("c")).unwrap();
    }

    #[test]
    fn anything_that_changes_the_steps_is_refused_naming_key_and_values() {
        let saved = settings("[training]\nbatch_size = 32\n").to_toml();
        let err = compare(
            &saved,
            &settings("[training]\nbatch_size = 64\n"),
            Path::new("c"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot resume: training.batch_size was 32 in the run, 64 now"
        );
        let err = compare(
            &saved,
            &settings("[training]\nbatch_size = 32\nseed = 3\n"),
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("training.seed was 0"), "{err}");
        let err = compare(
            &saved,
            &settings("[training]\nbatch_size = 32\n[model]\nhidden = [8]\n"),
            Path::new("c"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.hidden"), "{err}");
    }
}
