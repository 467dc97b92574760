//! End to end: SIGTERM (a batch scheduler, a service manager) and SIGHUP (a closed terminal)
//! stop a run as Ctrl-C does, after a checkpoint, with exit status 128 + the signal's number.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// How long any wait on a process may take before the test kills it and fails.
const LIMIT: Duration = Duration::from_secs(120);

/// A small MLP on the UCI digits, a checkpoint every 2 steps, `steps` steps in all.
fn config(dir: &Path, steps: u64) -> PathBuf {
    write(
        dir,
        "digits.toml",
        format!(
            "{}\n[model]\nhidden = [64]\n[training]\nepochs = 100\nbatch_size = 32\n\
             max_steps = {steps}\nthreads = 1\n[checkpoint]\nevery_steps = 2\nkeep = 2\n",
            digits_data()
        ),
    )
}

/// The run stopped by `signal` exits with `status`, says why on stderr, keeps a checkpoint of
/// the step it stopped at, and names the command that resumes it, which ends the run with the
/// weights of the run never stopped.
fn stopped_by(signal: i32, name: &str, status: i32) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 400);
    let reference = train_json(&config, &dir.path().join("whole"), &[]);

    let run = dir.path().join("run");
    let child = spawn_allcores(&train_args(&config, &run, &[]), false);
    let checkpoints = run.join("checkpoints");
    let child = wait_until(child, LIMIT, "the first checkpoint", || {
        checkpoints.is_dir()
    });
    send_signal(child.id() as i32, signal);
    let output = finish(child, LIMIT);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(status), "{err}");
    assert!(
        err.contains(&format!(
            "{name}: saving a checkpoint at the end of this step ({name} again to quit now)"
        )),
        "{err}"
    );

    let last = err.lines().last().unwrap_or_default();
    let step: u64 = last
        .strip_prefix("error: interrupted after step ")
        .and_then(|rest| rest.split_once(';'))
        .and_then(|(step, _)| step.parse().ok())
        .unwrap_or_else(|| panic!("not an interrupted run's line: {last}"));
    assert!(step > 0 && step < 400, "{last}");
    // The step it stopped at is the newest checkpoint.
    assert!(
        checkpoints.join(format!("step-{step:010}")).is_dir(),
        "no checkpoint of step {step} in {}",
        checkpoints.display()
    );
    let command = last
        .split_once("Resume with: allcores ")
        .map(|(_, command)| command)
        .unwrap_or_else(|| panic!("no resume command: {last}"));
    let mut args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(args.last(), Some(&"--resume"), "{command}");
    args.push("--json");
    let resumed = allcores(&args);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let resumed = last_json(&resumed);
    assert_eq!(resumed["steps"], 400);
    assert_eq!(resumed["weights_sha256"], reference["weights_sha256"]);
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_143() {
    stopped_by(libc::SIGTERM, "SIGTERM", 143);
}

#[test]
fn sighup_saves_a_checkpoint_and_exits_129() {
    stopped_by(libc::SIGHUP, "SIGHUP", 129);
}
