//! End to end: a run folder is never lost or mixed. A resume checks the folder against its
//! config whether or not it holds a checkpoint, a finished run is not run again, one process
//! owns a folder at a time, and default folders never collide.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A small CSV of two classes (`rows` rows of 4 features), from a seeded generator.
fn tiny_csv(dir: &Path, name: &str, rows: usize, seed: u64) -> PathBuf {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::new();
    for row in 0..rows {
        let label = row % 2;
        let features: Vec<String> = (0..4)
            .map(|_| format!("{:.3}", rng.random::<f32>() + label as f32))
            .collect();
        text.push_str(&format!("{},{label}\n", features.join(",")));
    }
    write(dir, name, text)
}

/// A config training a small MLP on a tiny CSV: fast enough to start hundreds of times.
fn tiny_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let csv = tiny_csv(dir, &format!("{name}.csv"), 40, 3);
    write(
        dir,
        &format!("{name}.toml"),
        format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.25\n\
             [model]\nhidden = [8]\n[training]\nepochs = 2\nbatch_size = 8\nthreads = 1\n{extra}",
            csv.display()
        ),
    )
}

/// `train config --out run --resume` is refused (exit 2, one line holding `expected`) and
/// leaves the folder as it was, byte for byte.
fn resume_refused(config: &Path, run: &Path, expected: &str) {
    let before = snapshot(run);
    let output = allcores(&train_command(config, run, &["--resume", "--quiet"], &[]));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(expected), "expected '{expected}' in: {err}");
    assert!(
        snapshot(run) == before,
        "the refused resume changed {}",
        run.display()
    );
}

#[test]
fn a_finished_run_without_checkpoints_is_never_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "[checkpoint]\nevery_epochs = 0\n");
    let run = dir.path().join("run");
    train_json(&config, &run, &[]);
    assert!(!run.join("checkpoints").exists());
    resume_refused(&config, &run, "holds a finished run and no checkpoint");
    // Another model on other data is refused for what it changes, before anything else.
    let other = tiny_config(dir.path(), "b", "[checkpoint]\nevery_epochs = 0\n");
    resume_refused(&other, &run, "cannot resume: data.train_csv was");
}

#[test]
fn a_finished_run_whose_checkpoints_are_gone_or_a_file_is_never_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "");
    let run = dir.path().join("run");
    train_json(&config, &run, &[]);
    // At its last step: nothing left to run.
    resume_refused(&config, &run, "holds a finished run (8 steps)");
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    resume_refused(&config, &run, "holds a finished run and no checkpoint");
    write(&run, "checkpoints", "not a folder");
    resume_refused(&config, &run, "holds a finished run and no checkpoint");
}

#[test]
fn a_folder_holding_someone_elses_config_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "");
    let folder = dir.path().join("mine");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "config.toml", "[server]\nport = 8080\n");
    resume_refused(&config, &folder, "cannot resume:");
    write(&folder, "config.toml", "not = [toml");
    resume_refused(&config, &folder, "holds no allcores run config");
}

/// A run interrupted before its first checkpoint (its folder holds its config) starts afresh
/// on resume and ends as the run that was never stopped.
#[test]
fn an_unfinished_run_without_checkpoints_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "");
    let reference = train_json(&config, &dir.path().join("whole"), &[]);
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::copy(
        dir.path().join("whole").join("config.toml"),
        run.join("config.toml"),
    )
    .unwrap();
    let output = allcores(&train_command(&config, &run, &["--resume", "--json"], &[]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("no checkpoint yet, starting the run afresh"));
    assert_eq!(
        last_json(&output)["weights_sha256"],
        reference["weights_sha256"]
    );
}

/// Two `train` processes started at once on one new folder: one trains, the other is refused
/// (exit 2), and the folder always holds one run, its config and weights the same run's.
#[test]
fn two_runs_started_at_once_on_one_folder_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "[checkpoint]\nevery_epochs = 0\n");
    let start = |run: &Path, seed: u64| {
        Command::new(env!("CARGO_BIN_EXE_allcores"))
            .args(train_command(
                &config,
                run,
                &["--quiet", "--json"],
                &[&format!("training.seed={seed}")],
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut refusals = 0;
    for round in 0..100 {
        let run = dir.path().join(format!("run-{round}"));
        let (a, b) = (start(&run, 1), start(&run, 2));
        let outputs: Vec<Output> = [a, b].map(|c| c.wait_with_output().unwrap()).into();
        let won: Vec<&Output> = outputs.iter().filter(|o| o.status.success()).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one run trains");
        let lost = outputs.iter().find(|o| !o.status.success()).unwrap();
        let err = stderr(lost);
        assert_eq!(lost.status.code(), Some(2), "round {round}: {err}");
        assert!(
            err.contains("is in use by another allcores process")
                || err.contains("already exists and is not empty"),
            "round {round}: {err}"
        );
        refusals += usize::from(err.contains("in use"));
        // The folder is the winner's: its config's seed, its summary's seed and weights.
        let summary = last_json(won[0]);
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        let seed = summary["seed"].as_u64().unwrap();
        assert!(saved.contains(&format!("seed = {seed}")), "round {round}");
        let on_disk: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(
            on_disk["weights_sha256"], summary["weights_sha256"],
            "round {round}"
        );
        let eval = allcores(&["eval", run.to_str().unwrap(), "--json"]);
        assert!(eval.status.success(), "round {round}: {}", stderr(&eval));
        assert_eq!(
            last_json(&eval)["weights_sha256"],
            summary["weights_sha256"]
        );
    }
    // The lock, not only the emptiness check, did the refusing in some rounds.
    eprintln!("{refusals} of 100 rounds refused by the lock");
}

/// Runs started without --out in the same second each get their own default folder.
#[test]
fn default_run_folders_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "tiny", "[checkpoint]\nevery_epochs = 0\n");
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_allcores"))
                .args(["train", config.to_str().unwrap(), "--quiet", "--json"])
                .current_dir(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut folders: Vec<String> = children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "{}", stderr(&output));
            last_json(&output)["run_dir"].as_str().unwrap().to_string()
        })
        .collect();
    folders.sort();
    folders.dedup();
    assert_eq!(folders.len(), 3, "{folders:?}");
    for folder in &folders {
        assert!(folder.starts_with("runs/tiny-"), "{folder}");
        assert!(dir.path().join(folder).join("model.safetensors").is_file());
    }
}

/// `cd dir && allcores train rel.toml`: the run folder's config finds the data from anywhere,
/// so `eval` and the printed resume command work from another folder.
#[test]
fn a_config_named_relative_to_the_working_folder_saves_absolute_paths() {
    let dir = tempfile::tempdir().unwrap();
    tiny_csv(dir.path(), "data.csv", 40, 5);
    write(
        dir.path(),
        "rel.toml",
        "[data]\nformat = \"csv\"\ntrain_csv = \"data.csv\"\ntest_fraction = 0.25\n\
         [model]\nhidden = [8]\n[training]\nepochs = 1\nbatch_size = 8\nthreads = 1\n",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_allcores"))
        .args(["train", "rel.toml", "--out", "run", "--quiet", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let saved = std::fs::read_to_string(dir.path().join("run").join("config.toml")).unwrap();
    let expected = dir.path().canonicalize().unwrap().join("data.csv");
    assert!(
        saved.contains(&format!("{:?}", expected.display().to_string())),
        "{saved}"
    );
    let eval = allcores(&["eval", dir.path().join("run").to_str().unwrap(), "--json"]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    assert_eq!(
        last_json(&eval)["weights_sha256"],
        last_json(&output)["weights_sha256"]
    );
}

/// `eval` names what is wrong with a run's weights file instead of scoring the wrong weights
/// or calling the run unfinished.
#[test]
fn eval_refuses_weights_that_are_not_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train_json(&config, &one, &[]);
    train_json(&config, &two, &["training.seed=9"]);
    std::fs::copy(two.join("model.safetensors"), one.join("model.safetensors")).unwrap();
    let output = allcores(&["eval", one.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("model.safetensors: these weights hash to"),
        "{err}"
    );
    assert!(err.contains("changed or replaced after the run"), "{err}");

    std::fs::remove_file(two.join("model.safetensors")).unwrap();
    std::fs::create_dir(two.join("model.safetensors")).unwrap();
    let output = allcores(&["eval", two.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("model.safetensors: is not a regular file"),
        "{err}"
    );
}

/// A checkpoint is input too: a state whose checksums match but whose position no run of this
/// config could reach is refused, naming its state file, instead of panicking on a slice or
/// replaying the schedule for hours.
#[test]
fn a_checkpoint_position_outside_the_run_is_refused() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "[checkpoint]\nevery_steps = 1\n");
    let run = dir.path().join("run");
    train_json(&config, &run, &["training.max_steps=3"]);
    // Unfinished, as if killed after step 3: its newest checkpoint is where a resume starts.
    std::fs::remove_file(run.join("model.safetensors")).unwrap();
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let newest = run.join("checkpoints").join("step-0000000003");
    let state_path = newest.join("state.json");
    let original = std::fs::read_to_string(&state_path).unwrap();
    let tamper = |field: &str, value: u64| {
        let mut state: serde_json::Value = serde_json::from_str(&original).unwrap();
        state["state"][field] = value.into();
        let text = serde_json::to_string_pretty(&state).unwrap();
        std::fs::write(&state_path, &text).unwrap();
        let manifest_path = newest.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        let hash: String = Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        manifest["files"]["state.json"] = hash.into();
        std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    };
    tamper("groups_done", 1_000_000);
    resume_refused(
        &config,
        &run,
        "step-0000000003/state.json: epoch 1 at step 1000000",
    );
    tamper("step", u64::MAX);
    resume_refused(&config, &run, "does not follow from epoch 1");
    tamper("samples", 7);
    resume_refused(&config, &run, "7 samples (24 in this epoch) do not follow");
    std::fs::write(&state_path, &original).unwrap();
    tamper("step", 3);
    let past = allcores(&train_command(
        &config,
        &run,
        &["--resume", "--quiet"],
        &["training.max_steps=2"],
    ));
    let err = stderr(&past);
    assert_eq!(past.status.code(), Some(2), "{err}");
    assert!(
        err.contains("it is at step 3, past this run's 2 steps"),
        "{err}"
    );
    // Untampered, it resumes.
    let output = allcores(&train_command(&config, &run, &["--resume", "--quiet"], &[]));
    assert!(output.status.success(), "{}", stderr(&output));
}

/// A FIFO in a run folder, where a resume reads the config or `eval` the summary, is refused
/// by what it is instead of blocking the command.
#[test]
fn a_fifo_in_a_run_folder_is_refused_not_waited_on() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path(), "a", "");
    let run = dir.path().join("run");
    train_json(&config, &run, &[]);
    let fifo = |path: &Path| {
        std::fs::remove_file(path).unwrap();
        let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0);
    };
    let bounded = |args: &[&str]| finish(spawn_allcores(args, false), Duration::from_secs(10));

    fifo(&run.join("summary.json"));
    let output = bounded(&["eval", run.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("summary.json: cannot read the summary: is a FIFO"),
        "{err}"
    );

    fifo(&run.join("config.toml"));
    let args = train_command(&config, &run, &["--resume", "--quiet"], &[]);
    let output = bounded(&args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config.toml: cannot read the run's config: is a FIFO"),
        "{err}"
    );
}
