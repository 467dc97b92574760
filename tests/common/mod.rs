//! Helpers for the end-to-end tests: configs on the shipped datasets, and running the binary.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn dataset(name: &str) -> String {
    repo().join("datasets").join(name).display().to_string()
}

/// The `[data]` section for the shipped MNIST subset.
pub fn mnist_data() -> String {
    format!(
        "[data]\nformat = \"idx\"\ntrain_images = \"{}\"\ntrain_labels = \"{}\"\n\
         test_images = \"{}\"\ntest_labels = \"{}\"\n",
        dataset("mnist8k-train-images-idx3-ubyte.gz"),
        dataset("mnist8k-train-labels-idx1-ubyte.gz"),
        dataset("mnist8k-test-images-idx3-ubyte.gz"),
        dataset("mnist8k-test-labels-idx1-ubyte.gz"),
    )
}

/// The `[data]` section for the shipped UCI digits, 20% held out.
pub fn digits_data() -> String {
    format!(
        "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.2\nscale = 16.0\n",
        dataset("uci-digits.csv.gz")
    )
}

/// Writes `text` as `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `allcores` with `args` and no extra environment.
pub fn allcores(args: &[&str]) -> Output {
    allcores_env(args, &[])
}

pub fn allcores_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_allcores"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("the binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON object on the last line of stdout.
pub fn last_json(output: &Output) -> serde_json::Value {
    let text = stdout(output);
    let line = text.lines().last().unwrap_or_else(|| {
        panic!("no stdout; stderr: {}", stderr(output));
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// `train CONFIG --out RUN`, then `flags`, then a `--set` for each of `sets`.
pub fn train_command<'a>(
    config: &'a Path,
    run: &'a Path,
    flags: &[&'a str],
    sets: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ];
    args.extend(flags);
    for set in sets {
        args.extend(["--set", set]);
    }
    args
}

/// `train CONFIG --out RUN --json --quiet` with a `--set` for each of `sets`.
pub fn train_args<'a>(config: &'a Path, run: &'a Path, sets: &[&'a str]) -> Vec<&'a str> {
    train_command(config, run, &["--json", "--quiet"], sets)
}

/// Trains `config` into `out` with `--json --quiet` and extra `--set`s; panics on failure.
pub fn train_json(config: &Path, out: &Path, sets: &[&str]) -> serde_json::Value {
    let output = allcores(&train_args(config, out, sets));
    assert!(output.status.success(), "train failed: {}", stderr(&output));
    last_json(&output)
}

/// Starts `allcores args` with stdout and stderr piped, in a process group of its own when
/// `own_group` (its pid is then the group's id, for a signal to the whole group, as a terminal
/// sends Ctrl-C). The stop signals start at their defaults: a test runner started in the
/// background may ignore SIGINT, and the child would keep ignoring it.
pub fn spawn_allcores(args: &[&str], own_group: bool) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_allcores"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if own_group {
        command.process_group(0);
    }
    // SAFETY: signal() is async-signal-safe, as the code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(signal, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    command.spawn().expect("the binary starts")
}

/// Sends `signal` to the process `pid`, or to the process group `-pid`.
pub fn send_signal(pid: i32, signal: i32) {
    // SAFETY: kill has no memory effects.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        sent,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// Waits until `ready()` holds, polling, and gives the child back; kills it and fails when it
/// ends first or when `limit` passes.
pub fn wait_until(
    mut child: Child,
    limit: Duration,
    what: &str,
    ready: impl Fn() -> bool,
) -> Child {
    let deadline = Instant::now() + limit;
    while !ready() {
        if child.try_wait().unwrap().is_some() {
            let output = finish(child, limit);
            panic!(
                "the process ended ({}) before {what}; make it longer: {}",
                output.status,
                stderr(&output)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no {what} after {limit:?}: the process was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Waits at most `limit` for the child to end and returns its output (its pipes read as it
/// runs); past `limit`, kills it and fails.
pub fn finish(mut child: Child, limit: Duration) -> Output {
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: the process was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Every file under `folder` with its bytes, sorted: to show that a refusal changed nothing.
pub fn snapshot(folder: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.path(), std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A text of seeded random words over a small alphabet, with line breaks: enough structure
/// for a GPT to learn something in a few steps.
pub fn random_text(chars: usize, seed: u64) -> String {
    const WORDS: [&str; 12] = [
        "the", "king", "queen", "speaks", "to", "a", "fool", "and", "his", "crown", "falls", "thee",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::new();
    while text.len() < chars {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        text.push(if rng.random_range(0..8) == 0 {
            '\n'
        } else {
            ' '
        });
    }
    text
}

/// A tiny GPT config (2 layers, width 16, context 16, 12 steps) on a random text in `dir`, the
/// last 20% validating: a run takes well under a second.
pub fn gpt_config(dir: &Path) -> PathBuf {
    let text = write(dir, "text.txt", random_text(6_000, 1));
    write(
        dir,
        "gpt.toml",
        format!(
            "[data]\nformat = \"text\"\ntrain_text = \"{}\"\nval_fraction = 0.2\n\n\
             [model]\nkind = \"gpt\"\nlayers = 2\nheads = 2\nwidth = 16\ncontext = 16\n\n\
             [optimizer]\nkind = \"adamw\"\nlr = 3e-3\nbeta2 = 0.99\nweight_decay = 0.1\n\
             schedule = \"cosine\"\nwarmup_steps = 2\nmin_lr = 3e-4\ngrad_clip = 1.0\n\n\
             [training]\nmax_steps = 12\nbatch_size = 4\neval_every = 4\nseed = 7\nthreads = 1\n",
            text.display()
        ),
    )
}

/// Trains `config` into `run` with `sets`, stopped after `stop` optimizer steps, then resumes it
/// with `sets` on 2 threads: the two runs' summaries.
pub fn stopped_then_resumed(
    config: &Path,
    run: &Path,
    sets: &[&str],
    stop: u64,
) -> (serde_json::Value, serde_json::Value) {
    let stop = format!("training.max_steps={stop}");
    let first = train_json(config, run, &[sets, &[stop.as_str()]].concat());
    let mut args = train_args(config, run, &[sets, &["training.threads=2"]].concat());
    args.push("--resume");
    let output = allcores(&args);
    assert!(
        output.status.success(),
        "resume failed: {}",
        stderr(&output)
    );
    (first, last_json(&output))
}
