//! End to end: checkpoints survive crashes, and a resumed run is bit for bit the run that was
//! never stopped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Small MNIST MLP, checkpoints every 2 steps, accumulation of 2 micro-batches per step (so a
/// kill often lands inside an accumulation group).
fn config(dir: &Path) -> PathBuf {
    write(
        dir,
        "mnist.toml",
        format!(
            "{}\n[model]\nhidden = [64]\n[training]\nepochs = 2\nbatch_size = 32\n\
             accumulation_steps = 2\nmax_steps = 160\nthreads = 1\n\
             [checkpoint]\nevery_steps = 2\nkeep = 2\n",
            mnist_data()
        ),
    )
}

/// (train loss, test loss, test accuracy) of every epoch, from metrics.jsonl.
fn metrics(run: &Path) -> Vec<(f64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let m: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                m["train_loss"].as_f64().unwrap(),
                m["test_loss"].as_f64().unwrap(),
                m["test_accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_allcores"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_run_stopped_and_resumed_with_other_threads_ends_as_the_uninterrupted_run() {
    stopped_and_resumed(&[]);
}

/// SGD's state (the velocity) is saved and restored as Adam's moments are.
#[test]
fn an_sgd_run_with_momentum_resumes_as_the_uninterrupted_run() {
    stopped_and_resumed(&["optimizer.kind=sgd", "optimizer.lr=0.05"]);
}

/// A run of `settings` stopped at step 57 (inside epoch 1, a step boundary that is no
/// checkpoint step's multiple of the epoch), then continued on 2 threads up to the same 160
/// steps, ends with the weights and metrics of the run never stopped.
fn stopped_and_resumed(settings: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let whole = dir.path().join("whole");
    let reference = train_json(&config, &whole, settings);

    let run = dir.path().join("resumed");
    let stop = [settings, &["training.max_steps=57"]].concat();
    let first = train_json(&config, &run, &stop);
    assert_eq!(first["steps"], 57);
    assert_ne!(first["weights_sha256"], reference["weights_sha256"]);
    let more = [settings, &["training.threads=2"]].concat();
    let mut args = train_args(&config, &run, &more);
    args.push("--resume");
    let output = allcores(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let resumed = last_json(&output);
    assert_eq!(resumed["steps"], 160);
    assert_eq!(resumed["threads"], 2);
    assert_eq!(resumed["weights_sha256"], reference["weights_sha256"]);
    assert_eq!(resumed["test_accuracy"], reference["test_accuracy"]);
    assert_eq!(metrics(&run), metrics(&whole));
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_resume_matches() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let reference = train_json(&config, &dir.path().join("whole"), &[]);

    let run = dir.path().join("run");
    // With SIGINT at its default: a test runner started in the background ignores it, and so
    // would the run (a signal ignored at the start stays ignored).
    let child = spawn_allcores(&train_args(&config, &run, &[]), false);
    // Interrupt once training has begun (the first checkpoint is there).
    let started = Instant::now();
    while !run.join("checkpoints").is_dir() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    if output.status.success() {
        // The run finished before the signal arrived: nothing to resume, the test says so.
        panic!("the run ended before Ctrl-C; make it longer: {err}");
    }
    assert_eq!(output.status.code(), Some(130), "{err}");
    // The command the message names resumes the run as it stands (the temporary folder's path
    // has no spaces, so it splits on them as a shell would).
    let command = err
        .lines()
        .find_map(|line| line.split_once("Resume with: allcores "))
        .map(|(_, command)| command.to_string())
        .unwrap_or_else(|| panic!("no resume command: {err}"));
    let mut args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(args.last(), Some(&"--resume"), "{command}");
    // `eval` of the unfinished run names the same command.
    let run_dir = args[args.iter().position(|&a| a == "--out").unwrap() + 1];
    let scored = allcores(&["eval", run_dir]);
    assert_eq!(scored.status.code(), Some(2));
    let refusal = stderr(&scored);
    assert!(refusal.contains("holds an unfinished run"), "{refusal}");
    assert!(refusal.contains(&command), "{refusal}");
    args.push("--json");
    let output = allcores(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        last_json(&output)["weights_sha256"],
        reference["weights_sha256"]
    );
}

#[test]
fn twenty_kills_lose_nothing_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let started = Instant::now();
    let whole = dir.path().join("whole");
    let reference = train_json(&config, &whole, &[]);
    let full = started.elapsed();
    // Every run that reaches its end, however often it was killed, must be the reference run.
    let check_finished = |run: &Path| {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(
            summary["weights_sha256"],
            reference["weights_sha256"],
            "{}",
            run.display()
        );
        assert_eq!(metrics(run), metrics(&whole), "{}", run.display());
    };

    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let (mut kills, mut mid_write, mut finished) = (0, 0, 0);
    let mut run = dir.path().join("killed-0");
    for attempt in 1.. {
        assert!(attempt < 500, "too many attempts");
        if kills == 20 {
            break;
        }
        let mut args = train_args(&config, &run, &[]);
        let fresh = !run.join("config.toml").exists();
        if !fresh {
            args.push("--resume");
        }
        let mut child = spawn(&args);
        if fresh {
            // A new run: the kill waits until its folder exists, so there is a run to resume.
            while !run.join("config.toml").exists() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // A random moment within the first tenth of a whole run's time.
        std::thread::sleep(full.mul_f64(rng.random_range(0.0..0.1)));
        match child.try_wait().unwrap() {
            Some(status) => {
                // It reached the end before the kill: check it, and go on with a new run.
                assert!(status.success(), "a resume failed: {status}");
                check_finished(&run);
                finished += 1;
                run = dir.path().join(format!("killed-{finished}"));
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                let temporaries = std::fs::read_dir(run.join("checkpoints"))
                    .map(|entries| {
                        entries
                            .flatten()
                            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                            .count()
                    })
                    .unwrap_or(0);
                if temporaries > 0 {
                    mid_write += 1;
                }
            }
        }
    }
    let mut args = train_args(&config, &run, &[]);
    args.push("--resume");
    let output = allcores(&args);
    assert!(
        output.status.success(),
        "the last resume failed: {}",
        stderr(&output)
    );
    check_finished(&run);
    eprintln!(
        "{kills} kills ({mid_write} during a checkpoint write), {} runs finished, 0 lost runs, \
         0 differing results",
        finished + 1
    );
}

#[test]
fn resume_refuses_changes_and_broken_checkpoints_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let run = dir.path().join("run");
    train_json(&config, &run, &["training.max_steps=10"]);
    let run_files = || snapshot(&run);
    let refused = |sets: &[&str], expected: &str| {
        let before = run_files();
        let mut args = train_args(&config, &run, sets);
        args.push("--resume");
        let output = allcores(&args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{sets:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(expected),
            "{sets:?}: expected '{expected}' in {err}"
        );
        assert!(
            run_files() == before,
            "{sets:?}: the failed resume changed the run folder"
        );
    };
    refused(
        &["training.batch_size=16"],
        "cannot resume: training.batch_size was 32 in the run, 16 now",
    );
    refused(&["model.hidden=[32]"], "model.hidden was [64]");
    refused(&["optimizer.lr=0.01"], "optimizer.lr");

    // Corrupt every checkpoint: a changed weights file, and a truncated one.
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(checkpoints.len(), 2, "keep = 2");
    let weights = checkpoints[0].join("model.bpk");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let weights = checkpoints[1].join("model.bpk");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    refused(&[], "checksum does not match the manifest");

    // A folder that is no run, and one that does not exist.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    write(&elsewhere, "notes.txt", "mine");
    let output = allcores(&train_command(&config, &elsewhere, &["--resume"], &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("holds no run to resume"),
        "{}",
        stderr(&output)
    );
    let missing = dir.path().join("missing");
    let output = allcores(&train_command(&config, &missing, &["--resume"], &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no such run folder"),
        "{}",
        stderr(&output)
    );
    assert!(!missing.exists());
}

#[test]
fn a_corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let reference = train_json(&config, &dir.path().join("whole"), &[]);
    let run = dir.path().join("run");
    train_json(&config, &run, &["training.max_steps=20"]);
    let newest = run.join("checkpoints").join("step-0000000020");
    std::fs::write(newest.join("optimizer.bpk"), b"garbage").unwrap();
    let mut args = train_args(&config, &run, &[]);
    args.push("--resume");
    let output = Command::new(env!("CARGO_BIN_EXE_allcores"))
        .args(args.iter().filter(|a| **a != "--quiet"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("skipping a checkpoint that does not verify"),
        "{err}"
    );
    assert!(err.contains("step-0000000018"), "{err}");
    assert_eq!(
        last_json(&output)["weights_sha256"],
        reference["weights_sha256"]
    );
}
