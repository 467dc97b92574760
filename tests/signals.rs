//! End to end: SIGTERM (a batch scheduler, a service manager) and SIGHUP (a closed terminal)
//! stop a run as Ctrl-C does, after a checkpoint, with exit status 128 + the signal's number;
//! a sweep stopped by a signal reports the runs that ended.

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

/// Who the signal goes to.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// The sweep's pid alone, as `kill PID` or a scheduler sends it.
    Sweep,
    /// The sweep's process group, its run in progress with it, as a terminal sends Ctrl-C.
    Group,
}

/// A sweep of 4 runs stopped by `signal` during its second run: it exits with `status`, writes
/// the report of the one run that ended (saying so), starts no other run, and the stopped run
/// kept a checkpoint that resumes to the weights of the same seed at the other thread count.
fn sweep_stopped(signal: i32, name: &str, status: i32, target: Target) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 400);
    let out = dir.path().join("sweep");
    let args = [
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1,2",
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let sweep = spawn_allcores(&args, true);
    // The first run (1 thread, seed 0) has ended once the second has a checkpoint.
    let second = out.join("runs/t2-s0");
    let sweep = wait_until(sweep, LIMIT, "the second run's first checkpoint", || {
        second.join("checkpoints").is_dir()
    });
    let pid = sweep.id() as i32;
    send_signal(if target == Target::Group { -pid } else { pid }, signal);
    let output = finish(sweep, LIMIT);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(status), "{err}");
    assert_eq!(
        err.lines().last().unwrap_or_default(),
        format!(
            "error: the sweep was interrupted by {name}: 1 of 4 runs ended, 3 did not run; the \
             report is in {}",
            out.display()
        ),
        "{err}"
    );
    assert!(
        !out.join("runs/t1-s1").exists(),
        "a run started after the signal"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    assert_eq!(
        (&runs[0]["threads"], &runs[0]["seed"]),
        (&1.into(), &0.into())
    );
    assert_eq!(report["failures"], serde_json::json!([]));
    let interrupted = &report["interrupted"];
    assert_eq!(interrupted["signal"], name);
    assert_eq!(interrupted["runs_not_run"], 3);
    let stopped = &interrupted["stopped_run"];
    assert_eq!(
        (&stopped["threads"], &stopped["seed"]),
        (&2.into(), &0.into())
    );
    assert_eq!(stopped["exit_status"], status);
    let message = stopped["message"].as_str().unwrap();
    assert!(message.contains("checkpoint saved"), "{message}");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains(&format!(
            "Interrupted by {name}: 3 of 4 planned runs did not run; the report covers the 1 \
             that ended. The run at threads 2, seed 0 was stopped: interrupted after step"
        )),
        "{md}"
    );
    assert!(md.contains("| 1 | 0 |"), "{md}");
    assert!(out.join("report.csv").is_file());
    let text = stdout(&output);
    assert!(text.contains(&format!("Interrupted by {name}")), "{text}");

    // The stopped run resumes on its own to the weights of seed 0 at 1 thread.
    let command = message
        .split_once("Resume with: allcores ")
        .map(|(_, command)| command)
        .unwrap_or_else(|| panic!("no resume command: {message}"));
    let mut args: Vec<&str> = command.split_whitespace().collect();
    args.push("--json");
    let resumed = allcores(&args);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let resumed = last_json(&resumed);
    assert_eq!(resumed["threads"], 2);
    assert_eq!(resumed["weights_sha256"], runs[0]["weights_sha256"]);
}

#[test]
fn ctrl_c_at_the_terminal_stops_a_sweep_with_its_report() {
    sweep_stopped(libc::SIGINT, "SIGINT", 130, Target::Group);
}

#[test]
fn sigint_to_the_sweep_alone_reaches_its_run_and_the_report() {
    sweep_stopped(libc::SIGINT, "SIGINT", 130, Target::Sweep);
}

#[test]
fn sigterm_to_the_sweep_alone_stops_it_with_143() {
    sweep_stopped(libc::SIGTERM, "SIGTERM", 143, Target::Sweep);
}
