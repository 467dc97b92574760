//! End to end: `allcores bench` runs one process per thread count and reports their
//! throughput; bad input ends with one line and exit status 2. No timing is asserted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn small_config(dir: &Path) -> PathBuf {
    write(
        dir,
        "digits.toml",
        format!(
            "{}\n[model]\nhidden = [16]\n[training]\nbatch_size = 64\nepochs = 1\n",
            digits_data()
        ),
    )
}

/// Runs `allcores` with `args` in `dir`, so that anything it writes lands there.
fn allcores_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_allcores"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

/// `allcores bench` on [`small_config`] in a fresh folder, with `args` after the config; the
/// folder is handed back for the test to look into.
fn bench_small(args: &[&str]) -> (tempfile::TempDir, Output) {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let command = [&["bench", config.to_str().unwrap()][..], args].concat();
    let output = allcores_in(dir.path(), &command);
    (dir, output)
}

#[test]
fn a_bench_measures_each_thread_count_in_its_own_process() {
    // 1,438 training rows in batches of 64: 23 steps an epoch, so 32 steps cross an epoch
    // end (and its short step) although the config asks for one epoch.
    let (dir, output) = bench_small(&[
        "--threads",
        "2,1",
        "--steps",
        "30",
        "--warmup",
        "2",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = last_json(&output);
    assert_eq!(report["model"], "mlp");
    assert_eq!(report["backend"], "ndarray");
    assert_eq!(report["batch_size"], 64);
    assert_eq!(report["warmup_steps"], 2);
    assert_eq!(report["timed_steps"], 30);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let threads: Vec<u64> = runs
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 2]);
    for run in runs {
        assert_eq!(run["steps"], 30, "{run}");
        // Steps 3..=32 of 23-step epochs: step 23 holds the epoch's last 30 rows.
        assert_eq!(run["samples"], 29 * 64 + 30, "{run}");
        for key in [
            "samples_per_second",
            "seconds",
            "step_ms_median",
            "step_ms_p10",
            "step_ms_p90",
            "step_ms_min",
            "step_ms_max",
            "cpu_utilization",
            "speedup",
            "parallel_efficiency",
        ] {
            let value = run[key].as_f64().unwrap_or_else(|| panic!("{key}: {run}"));
            assert!(value > 0.0, "{key}: {run}");
        }
        let ms = |key: &str| run[key].as_f64().unwrap();
        assert!(ms("step_ms_min") <= ms("step_ms_p10"), "{run}");
        assert!(ms("step_ms_p10") <= ms("step_ms_median"), "{run}");
        assert!(ms("step_ms_median") <= ms("step_ms_p90"), "{run}");
        assert!(ms("step_ms_p90") <= ms("step_ms_max"), "{run}");
        assert!(run["step_spread"].as_f64().unwrap() >= 0.0, "{run}");
        assert!(run["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{run}");
        assert_eq!(run["weights_sha256"].as_str().unwrap().len(), 64, "{run}");
    }
    assert_eq!(runs[0]["speedup"], 1.0);
    assert_eq!(runs[0]["parallel_efficiency"], 1.0);
    // One thread has no other to send polling; two may, and count it apart from the work.
    assert_eq!(runs[0]["cpu_polling"], 0.0);
    assert!(runs[1]["cpu_polling"].as_f64().unwrap() >= 0.0);
    assert_eq!(runs[0]["weights_sha256"], runs[1]["weights_sha256"]);
    assert_eq!(report["identical_weights"], true);
    // The runs wrote nothing: no run folder, no checkpoints.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["digits.toml"], "{left:?}");
}

#[test]
fn text_output_is_a_table_with_a_row_per_thread_count() {
    let (_dir, output) = bench_small(&[
        "--threads",
        "1,2",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--set",
        "training.backend=flex",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("mlp on flex, batch 64: 0 warm-up + 3 timed steps"),
        "{text}"
    );
    assert!(
        text.contains("| threads | samples/s | speed-up | parallel efficiency |"),
        "{text}"
    );
    assert!(text.contains("\n| 1 | "), "{text}");
    assert!(text.contains("\n| 2 | "), "{text}");
    assert!(text.contains("| 1.00x | 100% |"), "{text}");
    assert!(
        text.contains("weights: identical at every thread count"),
        "{text}"
    );
    let err = stderr(&output);
    assert!(err.contains("[2/2] threads 2: "), "{err}");
}

#[test]
fn bad_input_exits_2_on_one_line_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let config = config.to_str().unwrap();
    let missing = dir.path().join("missing.toml");
    for (args, expected) in [
        (
            vec!["--threads", ""],
            "--threads: give a comma-separated list",
        ),
        (vec!["--threads", "0"], "0 is not a thread count"),
        (vec!["--threads", "1,two"], "\"two\" is not a thread count"),
        (
            vec!["--threads", "1", "--steps", "0"],
            "--steps: must be at least 1",
        ),
        (
            vec!["--threads", "1", "--steps", "many"],
            "--steps: \"many\" is not",
        ),
        (
            vec!["--threads", "1", "--warmup", "-1"],
            "--warmup: \"-1\" is not",
        ),
        (
            vec!["--threads", "1", "--set", "training.threds=2"],
            "unknown field `threds`",
        ),
        (
            vec!["--threads", "1", "--set", "training.max_steps=2"],
            "use --steps and --warmup instead",
        ),
        (
            vec!["--threads", "1", "--repeat", "0"],
            "--repeat: must be 1 to 100, got 0",
        ),
        (
            vec!["--threads", "1", "--repeat", "twice"],
            "--repeat: \"twice\" is not a number of rounds",
        ),
        (
            vec!["--threads", "2,4", "--ceiling"],
            "--ceiling: compares n one-thread runs",
        ),
    ] {
        let mut all = vec!["bench", config];
        all.extend(&args);
        let output = allcores_in(dir.path(), &all);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected '{expected}' in: {err}"
        );
        assert!(stdout(&output).is_empty(), "{args:?}");
    }
    let output = allcores(&["bench", missing.to_str().unwrap(), "--threads", "1"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("config file not found"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_run_that_refuses_its_data_stops_the_bench_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let output = allcores_in(
        dir.path(),
        &[
            "bench",
            config.to_str().unwrap(),
            "--threads",
            "1,2",
            "--set",
            "data.train_csv=\"nowhere.csv\"",
        ],
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error: the run at threads 1 failed: ") && last.contains("nowhere.csv"),
        "{err}"
    );
}

/// `--ceiling` runs n one-thread runs at once after the run at n threads and reports what the
/// machine gave them; it needs the run at 1 thread to compare with.
#[test]
fn the_ceiling_runs_independent_single_thread_jobs() {
    let (_dir, output) = bench_small(&[
        "--steps",
        "5",
        "--warmup",
        "1",
        "--json",
        "--threads",
        "1,2",
        "--ceiling",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let runs = last_json(&output)["runs"].as_array().unwrap().clone();
    assert!(runs[0]["ceiling"].is_null(), "{}", runs[0]);
    let independent = runs[1]["independent_samples_per_second"].as_f64().unwrap();
    let ceiling = runs[1]["ceiling"].as_f64().unwrap();
    let alone = runs[0]["samples_per_second"].as_f64().unwrap();
    assert!(independent > 0.0 && ceiling > 0.0, "{}", runs[1]);
    assert!(
        (ceiling - independent / (2.0 * alone)).abs() < 1e-9,
        "{}",
        runs[1]
    );
    assert!(stderr(&output).contains("2 one-thread runs at once"));
}

/// `--repeat R` runs the thread counts R times round after round and reports each by its
/// median run, with every round's samples/s and efficiency.
#[test]
fn repeated_rounds_report_the_median_run() {
    let (_dir, output) = bench_small(&[
        "--threads",
        "1,2",
        "--steps",
        "5",
        "--warmup",
        "1",
        "--repeat",
        "3",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = last_json(&output);
    assert_eq!(report["identical_weights"], true);
    let numbers = |run: &serde_json::Value, key: &str| -> Vec<f64> {
        run[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let runs = report["runs"].as_array().unwrap();
    for run in runs {
        let mut rounds = numbers(run, "rounds_samples_per_second");
        assert_eq!(rounds.len(), 3, "{run}");
        rounds.sort_by(f64::total_cmp);
        assert_eq!(
            run["samples_per_second"].as_f64().unwrap(),
            rounds[1],
            "{run}"
        );
    }
    // Round i of 2 threads against round i of 1 thread.
    let (one, two) = (
        numbers(&runs[0], "rounds_samples_per_second"),
        numbers(&runs[1], "rounds_samples_per_second"),
    );
    let efficiency = numbers(&runs[1], "rounds_parallel_efficiency");
    assert_eq!(efficiency.len(), 3);
    for i in 0..3 {
        assert!((efficiency[i] - two[i] / (2.0 * one[i])).abs() < 1e-9);
    }
    assert_eq!(stderr(&output).matches("round 3/3").count(), 2);
}
