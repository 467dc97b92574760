//! Checkpoints that survive a crash.
//!
//! A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNNNNNN/` holding
//!
//! ```text
//! model.bpk           the f32 master weights (burnpack: parameter ids kept for the optimizer)
//! optimizer.bpk       the optimizer state (burn's burnpack record)
//! state.json          where the loop stands (see [`LoopState`]) and the settings it ran with
//! manifest.json       the format version and the SHA-256 of each file above
//! ```
//!
//! It is written under a temporary name, every file and the folder fsynced, then renamed into
//! place: a crash at any moment leaves the earlier checkpoints as they were. Loading checks the
//! manifest's checksums, so a truncated or corrupted checkpoint is refused, never half-read.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::files::{ReadError, read_regular};
use crate::precision::ScalerState;
use crate::summary::EpochMetrics;
use crate::weights::hex;

/// Bumped whenever the layout or the meaning of a checkpoint changes.
pub const FORMAT_VERSION: u32 = 1;

pub const CHECKPOINTS_DIR: &str = "checkpoints";
const MODEL_FILE: &str = "model.bpk";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";
const MANIFEST_FILE: &str = "manifest.json";

/// Everything besides weights and optimizer state that the loop needs to go on as if it had
/// never stopped. The data order needs no generator state: each epoch's order is a function of
/// `training.seed` and the epoch number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// The epoch in progress, from 1.
    pub epoch: u64,
    /// Optimizer steps done in this epoch: the next step starts at sample
    /// `groups_done x effective batch` of the epoch's order, at its first micro-batch.
    pub groups_done: u64,
    /// Optimizer steps done in the run (the learning-rate schedule is replayed to this point).
    pub step: u64,
    /// Training samples seen in the run.
    pub samples: u64,
    /// Sum of per-sample training loss over this epoch so far, and its sample count.
    pub epoch_loss_sum: f64,
    pub epoch_samples: u64,
    /// Training seconds of the run and of this epoch so far (throughput figures only).
    pub train_seconds: f64,
    pub epoch_seconds: f64,
    /// Metrics of the finished epochs and of the evaluations inside them, in order.
    pub metrics: Vec<EpochMetrics>,
    /// The loss scaler (checkpoints written before mixed precision have none: no scaling).
    #[serde(default)]
    pub scaler: ScalerState,
    /// Sum of per-sample training loss since the last evaluation, and its sample count: the
    /// train loss an evaluation reports.
    #[serde(default)]
    pub since_evaluation: (f64, u64),
}

/// A checkpoint on disk: its state, its settings and the paths of its binary parts.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub folder: PathBuf,
    pub state: LoopState,
    /// The settings the run had when it wrote this checkpoint, as TOML.
    pub settings: String,
}

impl Checkpoint {
    pub fn model_path(&self) -> PathBuf {
        self.folder.join(MODEL_FILE)
    }

    pub fn optimizer_bytes(&self) -> Result<Vec<u8>> {
        let path = self.folder.join(OPTIMIZER_FILE);
        read_regular(&path, None).map_err(|e| match e {
            ReadError::Io(e) => Error::io(&path, e),
            e => Error::Checkpoint {
                path: path.clone(),
                message: format!("cannot read: {e}"),
            },
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    /// File name to SHA-256.
    files: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    state: LoopState,
    settings: String,
}

/// Writes a checkpoint of `step` into `run_dir` and keeps the newest `keep` checkpoints.
pub fn write(
    run_dir: &Path,
    state: &LoopState,
    settings: &str,
    model: &[u8],
    optimizer: &[u8],
    keep: usize,
) -> Result<PathBuf> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = folder_name(state.step);
    let temporary = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let folder = root.join(&name);
    let state_json = serde_json::to_vec_pretty(&StateFile {
        state: state.clone(),
        settings: settings.to_string(),
    })
    .expect("the loop state serializes");
    let files: [(&str, &[u8]); 3] = [
        (MODEL_FILE, model),
        (OPTIMIZER_FILE, optimizer),
        (STATE_FILE, &state_json),
    ];
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        files: files
            .iter()
            .map(|(name, bytes)| (name.to_string(), sha256(bytes)))
            .collect(),
    };
    let manifest = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");

    let write_all = || -> std::io::Result<()> {
        if temporary.exists() {
            fs::remove_dir_all(&temporary)?;
        }
        fs::create_dir(&temporary)?;
        for (name, bytes) in files
            .iter()
            .chain([(MANIFEST_FILE, manifest.as_slice())].iter())
        {
            let mut file = File::create(temporary.join(name))?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        File::open(&temporary)?.sync_all()?;
        if folder.exists() {
            // A checkpoint of this step exists already (a resumed run passing the same step
            // again writes identical state): replace it.
            fs::remove_dir_all(&folder)?;
        }
        fs::rename(&temporary, &folder)?;
        File::open(&root)?.sync_all()
    };
    write_all().map_err(|e| Error::io(&folder, e))?;
    prune(&root, keep)?;
    Ok(folder)
}

/// Removes all but the newest `keep` checkpoints, and temporary folders of crashed writes.
fn prune(root: &Path, keep: usize) -> Result<()> {
    for entry in fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    let mut steps = list(root)?;
    steps.sort_unstable_by_key(|(step, _)| std::cmp::Reverse(*step));
    for (_, folder) in steps.into_iter().skip(keep) {
        fs::remove_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
    }
    Ok(())
}

/// The checkpoint folders under `root`, with their steps, in no particular order.
fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

/// The newest checkpoint of `run_dir` that verifies, with a line for each newer one that did
/// not (it is left in place, untouched). `Ok(None)` when there is none at all.
pub fn newest_valid(run_dir: &Path) -> Result<(Option<Checkpoint>, Vec<String>)> {
    let mut steps = list(&run_dir.join(CHECKPOINTS_DIR))?;
    steps.sort_unstable_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut refused = Vec::new();
    for (_, folder) in steps {
        match read(&folder) {
            Ok(checkpoint) => return Ok((Some(checkpoint), refused)),
            Err(e) => refused.push(e.to_string()),
        }
    }
    Ok((None, refused))
}

/// Reads and verifies one checkpoint folder.
pub fn read(folder: &Path) -> Result<Checkpoint> {
    let refuse = |path: &Path, message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let manifest_path = folder.join(MANIFEST_FILE);
    let manifest: Manifest = read_regular(&manifest_path, None)
        .map_err(|e| refuse(&manifest_path, format!("cannot read the manifest: {e}")))
        .and_then(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| refuse(&manifest_path, format!("corrupt manifest: {e}")))
        })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(refuse(
            &manifest_path,
            format!(
                "written by checkpoint format version {}, this allcores reads version \
                 {FORMAT_VERSION}",
                manifest.format_version
            ),
        ));
    }
    for name in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let path = folder.join(name);
        let expected = manifest
            .files
            .get(name)
            .ok_or_else(|| refuse(&manifest_path, format!("lists no checksum for {name}")))?;
        let bytes =
            read_regular(&path, None).map_err(|e| refuse(&path, format!("cannot read: {e}")))?;
        if &sha256(&bytes) != expected {
            return Err(refuse(
                &path,
                "checksum does not match the manifest (truncated or corrupted)".into(),
            ));
        }
    }
    let state_path = folder.join(STATE_FILE);
    let bytes = read_regular(&state_path, None).map_err(|e| match e {
        ReadError::Io(e) => Error::io(&state_path, e),
        e => refuse(&state_path, format!("cannot read: {e}")),
    })?;
    let StateFile { state, settings } = serde_json::from_slice(&bytes)
        .map_err(|e| refuse(&state_path, format!("corrupt state: {e}")))?;
    Ok(Checkpoint {
        folder: folder.to_path_buf(),
        state,
        settings,
    })
}

/// The shape of the run a checkpoint is resumed into, for [`check_position`].
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Samples in the training set (an epoch).
    pub samples: u64,
    /// Samples in a full step.
    pub step_size: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// Whether the run scales its loss (a scaler state must then hold a usable scale).
    pub scales: bool,
}

/// Refuses a loop state that no run of `shape` could have written. The checksums only prove
/// that the files are as written; a state written by hand (or by a bug) with a position past
/// the epoch's end panicked on a slice, and a step count past the run's replayed the learning
/// rate schedule for hours.
pub fn check_position(state: &LoopState, folder: &Path, shape: &RunShape) -> Result<()> {
    let refuse = |message: String| {
        Err(Error::Checkpoint {
            path: folder.join(STATE_FILE),
            message,
        })
    };
    let RunShape {
        samples,
        step_size,
        steps_per_epoch,
        total_steps,
        scales,
    } = *shape;
    if state.epoch == 0 || state.groups_done >= steps_per_epoch {
        return refuse(format!(
            "epoch {} at step {} of it lies outside a run of {steps_per_epoch} steps an epoch",
            state.epoch, state.groups_done
        ));
    }
    // Every finished epoch took all its steps and left one line of metrics.
    let finished_epochs = state.epoch - 1;
    let step = finished_epochs
        .checked_mul(steps_per_epoch)
        .and_then(|s| s.checked_add(state.groups_done));
    let epoch_ends = state.metrics.iter().filter(|m| !m.mid_epoch).count();
    if step != Some(state.step) || epoch_ends as u64 != finished_epochs {
        return refuse(format!(
            "step {} does not follow from epoch {}, {} steps into it, and {} finished epochs",
            state.step, state.epoch, state.groups_done, epoch_ends
        ));
    }
    if state.step > total_steps {
        return refuse(format!(
            "it is at step {}, past this run's {total_steps} steps (training.epochs, \
             training.max_steps)",
            state.step
        ));
    }
    let epoch_samples = state.groups_done.checked_mul(step_size);
    let run_samples = finished_epochs
        .checked_mul(samples)
        .zip(epoch_samples)
        .and_then(|(done, now)| done.checked_add(now));
    if epoch_samples != Some(state.epoch_samples) || run_samples != Some(state.samples) {
        return refuse(format!(
            "{} samples ({} in this epoch) do not follow from its position",
            state.samples, state.epoch_samples
        ));
    }
    let sums = [
        state.epoch_loss_sum,
        state.train_seconds,
        state.epoch_seconds,
    ];
    if sums.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
        return refuse("its loss sum or times are negative or not finite".into());
    }
    let scaler = &state.scaler;
    if scales && !(scaler.scale.is_finite() && scaler.scale > 0.0) {
        return refuse(format!(
            "its loss scale {} is not a positive number",
            scaler.scale
        ));
    }
    if scaler.skipped_steps > state.step || scaler.clean_steps > state.step {
        return refuse(format!(
            "its loss scaler counts more steps ({} skipped, {} clean) than the run's {}",
            scaler.skipped_steps, scaler.clean_steps, state.step
        ));
    }
    Ok(())
}

fn folder_name(step: u64) -> String {
    format!("step-{step:010}")
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> LoopState {
        LoopState {
            epoch: 1,
            groups_done: step,
            step,
            samples: step * 10,
            epoch_loss_sum: 0.1 + step as f64,
            epoch_samples: step * 10,
            train_seconds: 1.5,
            epoch_seconds: 1.5,
            metrics: Vec::new(),
            scaler: ScalerState::default(),
            since_evaluation: (0.25 + step as f64, step),
        }
    }

    /// The loop's sums and the finished epochs' metrics are f64s that a resume goes on from:
    /// a checkpoint must give back every bit of them, or the resumed run's metrics differ
    /// from the uninterrupted run's in the last digit.
    #[test]
    fn the_state_file_gives_back_every_bit_of_its_floats() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut value =
            || f64::from_bits(rng.random_range(0x3f00_0000_0000_0000..0x4100_0000_0000_0000u64));
        let mut written = state(4);
        written.epoch_loss_sum = value();
        written.metrics = (1..=500)
            .map(|epoch| EpochMetrics {
                epoch,
                steps: epoch,
                samples: epoch,
                train_loss: value(),
                test_loss: value(),
                test_accuracy: value(),
                lr: value(),
                samples_per_second: value(),
                cpu_utilization: value(),
                mid_epoch: false,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &written, "x = 1", b"model", b"optim", 1).unwrap();
        let read_back = newest_valid(dir.path()).unwrap().0.unwrap().state;
        let bits = |s: &LoopState| {
            let metrics = s.metrics.iter().flat_map(|m| {
                let throughput = [m.samples_per_second, m.cpu_utilization];
                [m.train_loss, m.test_loss, m.test_accuracy, m.lr]
                    .into_iter()
                    .chain(throughput)
            });
            std::iter::once(s.epoch_loss_sum)
                .chain(metrics)
                .map(f64::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&read_back), bits(&written));
    }

    /// A state no run of the shape could write is refused, field by field; a true one passes.
    #[test]
    fn a_position_outside_the_run_is_refused() {
        let shape = RunShape {
            samples: 100,
            step_size: 10,
            steps_per_epoch: 10,
            total_steps: 30,
            scales: true,
        };
        let mut good = state(4);
        good.scaler.scale = 1024.0;
        let check = |s: &LoopState| check_position(s, Path::new("c"), &shape);
        check(&good).unwrap();
        let refused = |change: &dyn Fn(&mut LoopState), expected: &str| {
            let mut bad = good.clone();
            change(&mut bad);
            let err = check(&bad).unwrap_err().to_string();
            assert!(err.starts_with("c/state.json: "), "{err}");
            assert!(err.contains(expected), "{expected}: {err}");
        };
        refused(
            &|s| s.groups_done = 10,
            "lies outside a run of 10 steps an epoch",
        );
        refused(&|s| s.epoch = 0, "lies outside");
        refused(&|s| s.step = 5, "step 5 does not follow");
        refused(&|s| s.epoch = 2, "does not follow from epoch 2");
        refused(&|s| s.samples = 41, "41 samples (40 in this epoch)");
        refused(&|s| s.epoch_loss_sum = f64::NAN, "not finite");
        refused(
            &|s| s.scaler.scale = 0.0,
            "loss scale 0 is not a positive number",
        );
        refused(
            &|s| s.scaler.skipped_steps = 5,
            "counts more steps (5 skipped",
        );
        let mut late = good.clone();
        (late.epoch, late.step, late.samples) = (4, 34, 340);
        late.metrics = vec![metrics(1), metrics(2), metrics(3)];
        let err = check(&late).unwrap_err().to_string();
        assert!(
            err.contains("at step 34, past this run's 30 steps"),
            "{err}"
        );
    }

    fn metrics(epoch: u64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            steps: 10 * epoch,
            samples: 100 * epoch,
            train_loss: 1.0,
            test_loss: 1.0,
            test_accuracy: 0.5,
            lr: 1e-3,
            samples_per_second: 1.0,
            cpu_utilization: 1.0,
            mid_epoch: false,
        }
    }

    #[test]
    fn writes_keeps_the_newest_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=5 {
            write(dir.path(), &state(step), "x = 1", b"model", b"optim", 3).unwrap();
        }
        let mut steps: Vec<u64> = list(&dir.path().join(CHECKPOINTS_DIR))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        steps.sort();
        assert_eq!(steps, vec![3, 4, 5]);
        let (newest, refused) = newest_valid(dir.path()).unwrap();
        let newest = newest.unwrap();
        assert!(refused.is_empty());
        assert_eq!(newest.state, state(5));
        assert_eq!(newest.settings, "x = 1");
        assert_eq!(newest.optimizer_bytes().unwrap(), b"optim");
    }

    #[test]
    fn a_corrupted_or_truncated_checkpoint_is_refused_and_the_previous_one_used() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &state(1), "", b"model-one", b"optim", 3).unwrap();
        let two = write(dir.path(), &state(2), "", b"model-two", b"optim", 3).unwrap();
        fs::write(two.join(MODEL_FILE), b"model-tw").unwrap();
        let (newest, refused) = newest_valid(dir.path()).unwrap();
        assert_eq!(newest.unwrap().state.step, 1);
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].contains("checksum does not match"),
            "{}",
            refused[0]
        );
        // The refused checkpoint is left as it was, for inspection.
        assert_eq!(fs::read(two.join(MODEL_FILE)).unwrap(), b"model-tw");
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let folder = write(dir.path(), &state(1), "", b"m", b"o", 3).unwrap();
        let manifest = folder.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest).unwrap();
        fs::write(
            &manifest,
            text.replace("\"format_version\": 1", "\"format_version\": 99"),
        )
        .unwrap();
        let err = read(&folder).unwrap_err().to_string();
        assert!(err.contains("format version 99"), "{err}");
    }

    #[test]
    fn crashed_writes_leave_temporaries_that_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &state(1), "", b"m", b"o", 3).unwrap();
        fs::create_dir(
            dir.path()
                .join(CHECKPOINTS_DIR)
                .join(".tmp-step-0000000002-1"),
        )
        .unwrap();
        let (newest, _) = newest_valid(dir.path()).unwrap();
        assert_eq!(newest.unwrap().state.step, 1);
    }
}
