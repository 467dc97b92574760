//! End to end: `allcores train` and `allcores eval` on the shipped datasets.

mod common;

use common::*;

const SMALL_MLP: &str = "\n[model]\nkind = \"mlp\"\nhidden = [32]\n";

#[test]
fn train_writes_a_complete_run_and_eval_scores_it_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "digits.toml",
        format!(
            "{}{SMALL_MLP}\n[training]\nepochs = 3\nbatch_size = 32\nthreads = 1\n",
            digits_data()
        ),
    );
    let run = dir.path().join("run");
    let summary = train_json(&config, &run, &[]);

    // The digits train to well above chance (10%) in three epochs.
    let accuracy = summary["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "accuracy {accuracy}");
    assert_eq!(summary["epochs"], 3);
    // 1,438 training rows (80% of 1,797) in batches of 32: 45 steps an epoch.
    assert_eq!(summary["steps"], 135);
    assert_eq!(summary["samples"], 3 * 1438);
    assert_eq!(summary["threads"], 1);
    assert_eq!(summary["backend"], "ndarray");
    for key in [
        "test_loss",
        "train_loss",
        "wall_seconds",
        "samples_per_second",
        "cpu_utilization",
        "peak_rss_bytes",
    ] {
        assert!(
            summary[key].as_f64().unwrap() > 0.0,
            "{key}: {}",
            summary[key]
        );
    }
    assert_eq!(summary["weights_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(summary["run_dir"], run.display().to_string());

    // The run folder: config, one metrics line per epoch, the summary, the weights.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(saved, summary);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["test_accuracy"], summary["test_accuracy"]);
    assert!(run.join("config.toml").is_file());
    assert!(run.join("model.safetensors").is_file());

    // eval scores the saved model exactly as the run scored it.
    let output = allcores(&["eval", run.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let evaluation = last_json(&output);
    assert_eq!(evaluation["test_accuracy"], summary["test_accuracy"]);
    assert_eq!(evaluation["weights_sha256"], summary["weights_sha256"]);
    let confusion = evaluation["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(total, evaluation["samples"].as_u64().unwrap());
    assert_eq!(total, 359);
}

#[test]
fn eval_can_score_another_test_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "digits.toml",
        format!(
            "{}{SMALL_MLP}\n[training]\nmax_steps = 5\nthreads = 1\n",
            digits_data()
        ),
    );
    let run = dir.path().join("run");
    train_json(&config, &run, &[]);
    let output = allcores(&[
        "eval",
        run.to_str().unwrap(),
        "--json",
        "--set",
        "data.test_fraction=0.5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(last_json(&output)["samples"], 899);

    // A model the saved weights do not fit is bad input, each tensor at fault named in one line.
    let output = allcores(&[
        "eval",
        run.to_str().unwrap(),
        "--set",
        "model.hidden=[16, 8]",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for problem in [
        "does not fit the model: ",
        "Mlp.hidden.0.weight is [64, 32] in the file, [64, 16] in the model",
        "Mlp.output.weight is [32, 10] in the file, [8, 10] in the model",
        "Mlp.hidden.1.weight missing",
    ] {
        assert!(err.contains(problem), "{problem}: {err}");
    }
}

#[test]
fn the_thread_count_changes_nothing_but_speed() {
    for backend in ["ndarray", "flex"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write(
            dir.path(),
            "mnist.toml",
            format!(
                "{}\n[model]\nhidden = [64, 32]\n[training]\nmax_steps = 25\nbatch_size = 64\n\
                 backend = \"{backend}\"\n",
                mnist_data()
            ),
        );
        let one = train_json(&config, &dir.path().join("t1"), &["training.threads=1"]);
        let two = train_json(&config, &dir.path().join("t2"), &["training.threads=2"]);
        // Idle threads sleeping instead of polling for work: scheduling only.
        let sleeping = train_json(
            &config,
            &dir.path().join("t2-sleep"),
            &["training.threads=2", "training.idle_threads=sleep"],
        );
        assert_eq!(one["threads"], 1);
        assert_eq!(two["threads"], 2);
        let polls = two["threads_available"].as_u64().unwrap() >= 2;
        assert_eq!(two["idle_threads"], if polls { "poll" } else { "sleep" });
        assert_eq!(sleeping["idle_threads"], "sleep");
        assert_eq!(one["weights_sha256"], two["weights_sha256"], "{backend}");
        assert_eq!(
            two["weights_sha256"], sleeping["weights_sha256"],
            "{backend}"
        );
        assert_eq!(one["test_accuracy"], two["test_accuracy"], "{backend}");
        assert_eq!(one["train_loss"], two["train_loss"], "{backend}");
        // ...and the seed does change the result: the hash can tell models apart.
        let other = train_json(&config, &dir.path().join("s1"), &["training.seed=1"]);
        assert_ne!(one["weights_sha256"], other["weights_sha256"], "{backend}");
    }
}

#[test]
fn environment_variables_override_the_file_and_set_overrides_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "digits.toml",
        format!(
            "{}{SMALL_MLP}\n[training]\nmax_steps = 9\nthreads = 1\n",
            digits_data()
        ),
    );
    let run = dir.path().join("run");
    let output = allcores_env(
        &train_command(&config, &run, &["--json", "--quiet"], &[]),
        &[("ALLCORES__TRAINING__MAX_STEPS", "4")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(last_json(&output)["steps"], 4);

    let run = dir.path().join("run2");
    let output = allcores_env(
        &train_command(
            &config,
            &run,
            &["--json", "--quiet"],
            &["training.max_steps=2"],
        ),
        &[("ALLCORES__TRAINING__MAX_STEPS", "4")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(last_json(&output)["steps"], 2);
}

/// The start line names the model, its parameter count and the threads in use; the summary
/// counts in words (singular for one,
/// digits grouped).
#[test]
fn the_start_and_summary_lines_name_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "digits.toml",
        format!(
            "{}{SMALL_MLP}\n[training]\nepochs = 1\nbatch_size = 32\nthreads = 2\n",
            digits_data()
        ),
    );
    let run = dir.path().join("run");
    let output = allcores(&train_command(&config, &run, &[], &[]));
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains("allcores: training mlp (2,410 parameters) on ndarray with 2 threads of"),
        "{log}"
    );
    assert!(
        log.contains(", idle threads polling") || log.contains(", idle threads sleeping"),
        "{log}"
    );
    assert!(log.contains("epoch 1: train loss"), "{log}");
    assert!(stdout(&output).contains("test accuracy"));
    // 1,438 training rows in batches of 32: 45 steps.
    let summary = stdout(&output);
    assert!(
        summary.contains("\n1 epoch · 45 steps · 1,438 samples in ")
            && summary.contains(" · 2 threads, CPU "),
        "{summary}"
    );

    let run = dir.path().join("quiet");
    let output = allcores(&train_command(
        &config,
        &run,
        &["--quiet"],
        &["training.threads=1"],
    ));
    assert!(output.status.success());
    assert_eq!(stderr(&output), "");
    assert!(
        stdout(&output).contains(" · 1 thread, CPU "),
        "{}",
        stdout(&output)
    );
}
