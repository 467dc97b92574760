//! End to end: `allcores sweep` trains a config at several thread counts and seeds, one
//! process a run, and reports whether the thread count changed the result.

mod common;

use std::path::Path;

use common::*;

/// A small MLP on the UCI digits, 20 steps: a run takes well under a second.
fn small_config(dir: &std::path::Path) -> std::path::PathBuf {
    write(
        dir,
        "digits.toml",
        format!(
            "{}\n[model]\nkind = \"mlp\"\nhidden = [16]\n\n[training]\nmax_steps = 20\n\
             batch_size = 32\n",
            digits_data()
        ),
    )
}

#[test]
fn a_sweep_over_threads_and_seeds_reports_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let out = dir.path().join("sweep");
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "2,1",
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "sweep failed: {}", stderr(&output));
    let report = last_json(&output);

    // Four runs, by seed then threads, each in its own folder with its summary and weights.
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    let order: Vec<(u64, u64)> = runs
        .iter()
        .map(|r| (r["seed"].as_u64().unwrap(), r["threads"].as_u64().unwrap()))
        .collect();
    assert_eq!(order, [(0, 1), (0, 2), (1, 1), (1, 2)]);
    for run in runs {
        let (t, s) = (
            run["threads"].as_u64().unwrap(),
            run["seed"].as_u64().unwrap(),
        );
        let run_dir = out.join("runs").join(format!("t{t}-s{s}"));
        assert_eq!(run["run_dir"], run_dir.display().to_string());
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["threads"], t);
        assert_eq!(summary["seed"], s);
        assert_eq!(summary["steps"], 20);
        assert_eq!(summary["weights_sha256"], run["weights_sha256"]);
        assert_eq!(summary["test_accuracy"], run["test_accuracy"]);
        assert!(run_dir.join("model.safetensors").is_file());
        assert_eq!(run["max_weight_diff"], 0.0);
    }

    // Same seed, same weights at 1 and 2 threads; another seed, other weights.
    assert_eq!(runs[0]["weights_sha256"], runs[1]["weights_sha256"]);
    assert_eq!(runs[2]["weights_sha256"], runs[3]["weights_sha256"]);
    assert_ne!(runs[0]["weights_sha256"], runs[2]["weights_sha256"]);
    assert_eq!(runs[0]["speedup"], 1.0);
    assert_eq!(runs[0]["efficiency"], 1.0);
    let speedup = runs[1]["speedup"].as_f64().unwrap();
    let efficiency = runs[1]["efficiency"].as_f64().unwrap();
    assert!((efficiency - speedup / 2.0).abs() < 1e-12);

    let verdict = &report["verdict"];
    assert_eq!(verdict["outcome"], "identical");
    assert_eq!(verdict["seeds_compared"], 2);
    assert_eq!(verdict["runs_differing"], 0);
    assert_eq!(verdict["accuracy_spread_across_threads"], 0.0);
    let line = verdict["line"].as_str().unwrap();
    assert!(
        line.starts_with("identical: the thread count changed the speed, never the result"),
        "{line}"
    );
    // The verdict is on stdout, before the JSON.
    assert!(stdout(&output).lines().any(|l| l == line));
    assert_eq!(report["baseline_threads"], 1);
    assert_eq!(report["plan"]["threads"], serde_json::json!([1, 2]));
    assert_eq!(report["failures"], serde_json::json!([]));
    let timing = &report["timing"];
    let sweep = timing["sweep_seconds"].as_f64().unwrap();
    let runs_wall = timing["runs_wall_seconds"].as_f64().unwrap();
    assert!(sweep > runs_wall && runs_wall > 0.0, "{timing}");

    // The report files.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved, report);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains(line), "{md}");
    assert!(md.contains("| threads | seed | test accuracy |"), "{md}");
    assert!(
        md.contains("against the 1-thread run of the same seed"),
        "{md}"
    );
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].starts_with("threads,seed,test_accuracy,"), "{csv}");
    assert!(lines[1].starts_with("1,0,"), "{csv}");
    for plot in ["accuracy.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("threads"), "{plot}");
    }
}

#[test]
fn text_output_shows_the_table_and_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let out = dir.path().join("sweep");
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "sweep failed: {}", stderr(&output));
    let text = stdout(&output);
    // One thread count: the baseline is 2 threads, and nothing is compared.
    assert!(text.contains("| 2 | 0 |"), "{text}");
    assert!(text.contains("1 thread is not in the sweep"), "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("inconclusive: no seed has finished runs at two thread counts"),
        "{text}"
    );
    assert!(stderr(&output).contains("[1/1] threads 2, seed 0: test accuracy"));
}

#[test]
fn bad_thread_lists_exit_2_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let out = dir.path().join("sweep");
    for (threads, expected) in [
        ("0", "0 is not a thread count"),
        ("a,b", "\"a\" is not a thread count"),
        ("", "comma-separated list"),
        ("1,1", "1 appears twice"),
        ("-2", "\"-2\" is not a thread count"),
    ] {
        let output = allcores(&[
            "sweep",
            config.to_str().unwrap(),
            "--threads",
            threads,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(2), "--threads {threads:?}");
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: --threads: "), "{err}");
        assert!(err.contains(expected), "{threads:?}: {err}");
        assert!(!out.exists());
    }
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--seeds",
        "0",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output).trim(), "error: --seeds: must be at least 1");
}

#[test]
fn a_config_error_exits_2_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "bad.toml",
        format!("{}\n[training]\nthreds = 2\n", digits_data()),
    );
    let out = dir.path().join("sweep");
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("threds"), "{err}");
    assert!(!out.exists(), "no run may start");

    // A bad override of the runs is a config error too.
    let good = small_config(dir.path());
    let output = allcores(&[
        "sweep",
        good.to_str().unwrap(),
        "--threads",
        "1,2",
        "--set",
        "training.batch_size=0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).starts_with("error: training.batch_size: must be at least 1"));
    assert!(!out.exists());

    // The sweep owns training.threads and training.seed.
    let output = allcores(&[
        "sweep",
        good.to_str().unwrap(),
        "--threads",
        "1,2",
        "--set",
        "training.seed=3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("use --seeds instead"));
    assert!(!out.exists());

    // A folder that cannot be made stops the sweep before its first run.
    let blocked = write(dir.path(), "a-file", "").join("sweep");
    let output = allcores(&[
        "sweep",
        good.to_str().unwrap(),
        "--threads",
        "1",
        "--out",
        blocked.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot create the folder"), "{err}");
}

#[test]
fn a_missing_dataset_stops_the_sweep_at_its_first_run_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "nodata.toml",
        "[data]\nformat = \"csv\"\ntrain_csv = \"missing.csv\"\ntest_fraction = 0.2\n",
    );
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1,2",
        "--seeds",
        "3",
        "--out",
        dir.path().join("sweep").to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error: the run at threads 1, seed 0 refused its input: "),
        "{err}"
    );
    assert!(last.contains("missing.csv"), "{err}");
    // Only the first run was tried.
    assert!(!err.contains("[2/6]"), "{err}");
}

#[test]
fn failed_runs_are_reported_and_the_sweep_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let out = dir.path().join("sweep");
    // A learning rate this large makes the loss infinite within a few steps.
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1,2",
        "--set",
        "optimizer.kind=sgd",
        "--set",
        "optimizer.lr=1e30",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report = last_json(&output);
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2);
    assert_eq!(failures[1]["threads"], 2);
    assert_eq!(failures[1]["exit_status"], 1);
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("training diverged"),
        "{}",
        failures[0]
    );
    assert_eq!(report["verdict"]["outcome"], "inconclusive");
    let err = stderr(&output);
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("error: 2 of 2 runs failed (first: threads 1, seed 0: training diverged"),
        "{err}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Failed runs"), "{md}");
}

/// One process owns a sweep folder at a time: a sweep on a folder another process holds is
/// refused at once, naming the holder, and writes nothing into it.
#[test]
fn a_sweep_folder_another_process_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let out = dir.path().join("sweep");
    let (_, held) = allcores_trainer::lock::claim_new_folder(&out, false).unwrap();
    let args = [
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let output = allcores(&args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let pid = std::process::id();
    assert!(
        err.contains(&format!(
            "is in use by another allcores process (pid {pid})"
        )),
        "{err}"
    );
    let entries: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "only the holder's .owner record");
    drop(held);
    assert!(allcores(&args).status.success());
}

/// A language model's sweep compares validation loss: the log, the verdict, the report and the
/// plot speak of it, and of tokens/s next to samples/s.
#[test]
fn a_gpt_sweep_reports_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let out = dir.path().join("sweep");
    let output = allcores(&[
        "sweep",
        config.to_str().unwrap(),
        "--threads",
        "1,2",
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "sweep failed: {}", stderr(&output));
    let report = last_json(&output);
    assert_eq!(report["metric"], "val_loss");

    let verdict = &report["verdict"];
    assert_eq!(verdict["outcome"], "identical");
    assert_eq!(verdict["seeds_compared"], 2);
    assert_eq!(verdict["val_loss_spread_across_threads"], 0.0);
    let line = verdict["line"].as_str().unwrap();
    assert!(
        line.starts_with("identical: the thread count changed the speed, never the result"),
        "{line}"
    );
    assert!(stdout(&output).lines().any(|l| l == line));

    // Each run's validation loss and tokens/s are its summary's; seed for seed, equal.
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for run in runs {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(run["run_dir"].as_str().unwrap()).join("summary.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(run["val_loss"], summary["val_loss"]);
        assert_eq!(run["tokens_per_second"], summary["tokens_per_second"]);
        assert!(run["val_loss"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert_eq!(runs[0]["val_loss"], runs[1]["val_loss"]);
    assert_eq!(runs[2]["val_loss"], runs[3]["val_loss"]);
    let mean = report["by_threads"][0]["mean_val_loss"].as_f64().unwrap();
    let expected =
        (runs[0]["val_loss"].as_f64().unwrap() + runs[2]["val_loss"].as_f64().unwrap()) / 2.0;
    assert!((mean - expected).abs() < 1e-12, "{mean} {expected}");

    let err = stderr(&output);
    let logged = format!(
        "[1/4] threads 1, seed 0: val loss {:.4} · ",
        runs[0]["val_loss"].as_f64().unwrap()
    );
    assert!(err.contains(&logged), "{err}");
    assert!(err.contains(" tokens/s · "), "{err}");
    assert!(!err.contains("test accuracy"), "{err}");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains(line), "{md}");
    assert!(md.contains("| threads | seed | validation loss |"), "{md}");
    assert!(
        md.contains("| mean validation loss | validation loss min-max |"),
        "{md}"
    );
    assert!(md.contains("| samples/s | tokens/s |"), "{md}");
    assert!(md.contains("Validation loss spread across seeds"), "{md}");
    assert!(md.contains("](val_loss.svg)"), "{md}");
    assert!(!md.contains("test accuracy"), "{md}");
    assert!(!md.contains("accuracy.svg"), "{md}");

    let svg = std::fs::read_to_string(out.join("val_loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("Validation loss by thread count"),
        "{svg}"
    );
    assert!(out.join("throughput.svg").is_file());
    assert!(!out.join("accuracy.svg").exists());
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(csv.starts_with("threads,seed,val_loss,"), "{csv}");
}
