//! One `allcores train ... --json --quiet` child process and its summary: what `sweep` and
//! `bench` both run, one process a thread count, because matrixmultiply reads its thread
//! count once per process.

use std::ffi::OsStr;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use allcores_trainer::Summary;
use allcores_trainer::threads::available_threads;

use crate::EvalError;
use crate::signals::Interrupt;

/// Why a child run gave no summary.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChildFailure {
    /// The child's exit status; `None` when it was killed by a signal or never started.
    pub exit_status: Option<i32>,
    /// The child's error line (without its `error: `), or why it could not be read.
    pub message: String,
}

/// The message of a child that an interrupt kept from starting.
const NOT_STARTED: &str = "not started: interrupted";

impl ChildFailure {
    /// Whether the child started (a failure to start it counts as started: it was tried).
    pub fn started(&self) -> bool {
        !(self.exit_status.is_none() && self.message == NOT_STARTED)
    }
}

/// The `allcores` executable to run: `given`, or this process's own.
pub(crate) fn program(given: Option<&PathBuf>) -> Result<PathBuf, EvalError> {
    match given {
        Some(program) => Ok(program.clone()),
        None => std::env::current_exe().map_err(|source| EvalError::Launch {
            program: "allcores".into(),
            source,
        }),
    }
}

/// Refuses a `--set` of a key the command sets for each child run itself: `owned` pairs each
/// such key with the flag that sets it (named in the error).
pub(crate) fn refuse_owned_keys(
    overrides: &[String],
    owned: &[(&str, &str)],
    command: &str,
) -> Result<(), EvalError> {
    for item in overrides {
        let key = item
            .split_once('=')
            .map_or(item.as_str(), |(k, _)| k)
            .trim();
        if let Some((_, flag)) = owned.iter().find(|(set, _)| *set == key) {
            return Err(EvalError::Argument {
                arg: format!("--set {key}"),
                message: format!("the {command} sets {key} for each run: use {flag} instead"),
            });
        }
    }
    Ok(())
}

/// Warns (stderr) about each thread count above what this machine allows; returns that number.
pub(crate) fn warn_beyond_available(threads: &[usize]) -> usize {
    let available = available_threads();
    for &t in threads.iter().filter(|&&t| t > available) {
        eprintln!(
            "warning: --threads {t} is more than the {available} threads this machine allows: \
             those runs share cores (expect no speed-up)"
        );
    }
    available
}

/// Runs `program train CONFIG [--set SET]... [ARGS]... --json --quiet` and reads the summary
/// from its last stdout line. The `sets` come in order: a later one wins. With an `interrupt`,
/// the signals it receives are passed on to the child; once it has stopped, no child starts (a
/// failure that [`ChildFailure::started`] tells).
pub(crate) fn train_child<S, A>(
    program: &Path,
    config: &Path,
    sets: S,
    args: &[A],
    interrupt: Option<&Interrupt>,
) -> Result<Summary, ChildFailure>
where
    S: IntoIterator<Item = String>,
    A: AsRef<OsStr>,
{
    let failure = |exit_status: Option<i32>, message: String| ChildFailure {
        exit_status,
        message,
    };
    let mut command = Command::new(program);
    command.arg("train").arg(config);
    for set in sets {
        command.arg("--set").arg(set);
    }
    command
        .args(args)
        .args(["--json", "--quiet"])
        .stdin(Stdio::null());
    let cannot_start =
        |e: std::io::Error| failure(None, format!("cannot start {}: {e}", program.display()));
    let output = match interrupt {
        None => command.output().map_err(cannot_start)?,
        Some(interrupt) => match output_passing_signals(&mut command, interrupt) {
            Ok(Some(output)) => output,
            Ok(None) => return Err(failure(None, NOT_STARTED.into())),
            Err(e) => return Err(cannot_start(e)),
        },
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last_line = |text: &str| {
        text.lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    if !output.status.success() {
        let message = last_line(&stderr)
            .map(|l| l.strip_prefix("error: ").unwrap_or(&l).to_string())
            .unwrap_or_else(|| format!("the run stopped ({})", output.status));
        return Err(failure(output.status.code(), message));
    }
    let Some(line) = last_line(&stdout) else {
        return Err(failure(Some(0), "the run printed no summary".into()));
    };
    serde_json::from_str::<Summary>(&line).map_err(|e| {
        failure(
            Some(0),
            format!("the run's last line is not a summary ({e})"),
        )
    })
}

/// `command.output()`, with the child known to `interrupt` while it runs (so that it gets the
/// signals the interrupt receives); `None` when the interrupt had stopped before it started.
fn output_passing_signals(
    command: &mut Command,
    interrupt: &Interrupt,
) -> std::io::Result<Option<Output>> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let Some(mut child) = interrupt.spawn_child(command)? else {
        return Ok(None);
    };
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both pipes were asked for");
    };
    // Both pipes are drained at once, so that a child filling one never blocks on it.
    let stderr_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let mut stdout_bytes = Vec::new();
    let _ = stdout.read_to_end(&mut stdout_bytes);
    let stderr_bytes = stderr_reader.join().unwrap_or_default();
    // The pipes closed: the child is exiting. Its pid stays its own until it is reaped below.
    interrupt.forget_child();
    let status = child.wait()?;
    Ok(Some(Output {
        status,
        stdout: stdout_bytes,
        stderr: stderr_bytes,
    }))
}
