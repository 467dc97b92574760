//! The language model end to end: a small GPT on a seeded random text trains to the same
//! weights at every thread count on every execution path, resumes after SIGKILL as if never
//! stopped, samples the same text for the same seed, is scored by `eval`, and refuses bad input
//! with one line and exit status 2.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Every execution path gives the same weights at 1 and 2 threads, and the paths differ from
/// one another (each changes the arithmetic: the test would see a path that ignored its key).
#[test]
fn the_same_weights_at_one_and_two_threads_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let paths: [&[&str]; 9] = [
        &[],
        &["training.accumulation_steps=4", "training.batch_size=1"],
        &["training.shards=2"],
        &["training.precision=bf16"],
        &["training.precision=bf16", "training.backend=flex"],
        // f16 with dynamic loss scaling, on both backends.
        &["training.precision=f16"],
        &["training.precision=f16", "training.backend=flex"],
        // Dropout, drawn by window and step: the same at any thread count, in bf16 too.
        &["model.dropout=0.2"],
        &[
            "model.dropout=0.2",
            "training.precision=bf16",
            "training.backend=flex",
        ],
    ];
    let mut hashes = Vec::new();
    for (i, sets) in paths.iter().enumerate() {
        let run = |threads: &str| {
            let out = dir.path().join(format!("run-{i}-{threads}"));
            let set = format!("training.threads={threads}");
            train_json(&config, &out, &[sets, &[set.as_str()][..]].concat())
        };
        let (one, two) = (run("1"), run("2"));
        assert_eq!(one["weights_sha256"], two["weights_sha256"], "{sets:?}");
        assert_eq!(one["val_loss"], two["val_loss"], "{sets:?}");
        assert!(one["val_loss"].as_f64().unwrap() < 3.0, "{one}");
        assert_eq!(one["steps"], 12);
        hashes.push(one["weights_sha256"].as_str().unwrap().to_string());
    }
    let mut distinct = hashes.clone();
    distinct.sort();
    distinct.dedup();
    // Accumulation of 4 x 1 and shards of 4 = 2 x 2 compute the same large batch, but round
    // differently: every path is its own hash.
    assert_eq!(distinct.len(), hashes.len(), "{hashes:?}");
}

/// A run killed with SIGKILL after a checkpoint and resumed ends with the uninterrupted run's
/// weights, evaluations and validation loss.
#[test]
fn a_killed_run_resumes_to_the_uninterrupted_runs_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let sets = ["training.max_steps=400", "checkpoint.every_steps=5"];
    let whole = train_json(&config, &dir.path().join("whole"), &sets);
    let run = dir.path().join("killed");
    let mut args = train_args(&config, &run, &sets);
    let mut child = spawn_allcores(&args, false);
    let checkpoints = run.join("checkpoints");
    let started = Instant::now();
    while std::fs::read_dir(&checkpoints).map_or(0, |d| d.count()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run ended before the kill");
    args.push("--resume");
    let output = allcores(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let resumed = last_json(&output);
    assert_eq!(resumed["weights_sha256"], whole["weights_sha256"]);
    assert_eq!(resumed["val_loss"], whole["val_loss"]);
    let metrics = |run: &Path| std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines = |text: String| {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["steps"].clone(),
                    v["test_loss"].clone(),
                    v["train_loss"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lines(metrics(&run)),
        lines(metrics(&dir.path().join("whole")))
    );
}

/// `sample` writes the prompt and the asked number of characters, the same for a seed, other
/// text for another seed; `eval` gives the run's validation loss back.
#[test]
fn sample_and_eval_use_the_runs_model_and_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let run = dir.path().join("run");
    let summary = train_json(&config, &run, &[]);
    let run_arg = run.to_str().unwrap();
    let sample = |seed: &str| {
        let output = allcores(&[
            "sample",
            run_arg,
            "--prompt",
            "the king",
            "--tokens",
            "40",
            "--seed",
            seed,
            "--top-k",
            "5",
            "--temperature",
            "0.8",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    let (first, again, other) = (sample("1"), sample("1"), sample("2"));
    assert_eq!(first, again);
    assert_ne!(first, other);
    assert!(first.starts_with("the king"), "{first:?}");
    assert_eq!(
        first.trim_end_matches('\n').chars().count(),
        "the king".len() + 40,
        "{first:?}"
    );

    let output = allcores(&["eval", run_arg, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let evaluation = last_json(&output);
    assert_eq!(evaluation["val_loss"], summary["val_loss"]);
    assert_eq!(evaluation["weights_sha256"], summary["weights_sha256"]);
}

/// Bad input stops before anything is written: exit status 2, one line naming the fault.
#[test]
fn bad_input_is_refused_with_one_line_and_no_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let empty = write(dir.path(), "empty.txt", "");
    let short = write(dir.path(), "short.txt", "abc");
    let mut invalid = random_text(100, 2).into_bytes();
    invalid[37] = 0xFF;
    let invalid = write(dir.path(), "invalid.txt", invalid);
    let foreign = write(dir.path(), "foreign.txt", random_text(100, 3) + "é");
    let set = |key: &str, path: &Path| format!("{key}=\"{}\"", path.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![set("data.train_text", &empty)], "holds no text"),
        (vec![set("data.train_text", &short)], "short"),
        (vec![set("data.train_text", &invalid)], "byte 37"),
        (vec!["model.heads=3".into()], "model.heads"),
        (vec!["model.context=0".into()], "model.context"),
        (vec!["model.layers=0".into()], "model.layers"),
        (vec!["model.width=0".into()], "model.width"),
        (vec!["data.val_fraction=1.5".into()], "data.val_fraction"),
        (vec![set("data.val_text", &foreign)], "data.val_fraction"),
        (
            vec!["data.val_fraction=0.5".into(), "model.kind=mlp".into()],
            "model.kind",
        ),
        (vec!["model.hidden=[8]".into()], "model.hidden"),
        (
            vec!["model.dropout=1".into()],
            "model.dropout: must be at least 0 and below 1",
        ),
        (vec!["model.dropout=-0.1".into()], "model.dropout"),
        (
            vec!["model.kind=mlp".into(), "model.dropout=0.1".into()],
            "model.",
        ),
    ];
    for (i, (sets, expected)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("bad-{i}"));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let output = allcores(&train_args(&config, &out, &sets));
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{sets:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{sets:?}: {message}");
        assert!(message.contains(expected), "{sets:?}: {message}");
        assert!(!out.exists(), "{sets:?} left a run folder");
    }
    // A validation text holding a character the training text lacks.
    let config_text = std::fs::read_to_string(&config).unwrap().replace(
        "val_fraction = 0.2",
        &format!("val_text = \"{}\"", foreign.display()),
    );
    let foreign_config = write(dir.path(), "foreign.toml", config_text);
    let out = dir.path().join("bad-foreign");
    let output = allcores(&train_args(&foreign_config, &out, &[]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("'é'"), "{}", stderr(&output));
    assert!(!out.exists());

    // `sample`'s own bad input, on a finished run.
    let run = dir.path().join("run");
    train_json(&config, &run, &[]);
    let run_arg = run.to_str().unwrap();
    for (args, expected) in [
        (vec!["--prompt", "é"], "--prompt"),
        (vec!["--tokens", "0"], "--tokens"),
        (vec!["--temperature", "0"], "--temperature"),
        (vec!["--temperature", "-1"], "--temperature"),
        (vec!["--top-k", "0"], "--top-k"),
        (vec!["--top-k", "1000"], "--top-k"),
    ] {
        let output = allcores(&[&["sample", run_arg][..], &args].concat());
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let unfinished = dir.path().join("unfinished");
    std::fs::create_dir(&unfinished).unwrap();
    let output = allcores(&["sample", unfinished.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

/// Dropout's draws are keyed by step: a run with dropout stopped at step 5 and resumed on 2
/// threads ends with the weights of the run that never stopped. (A constant rate: a cosine
/// schedule's length is the run's, which the stop at 5 steps would change.)
#[test]
fn a_run_with_dropout_resumes_to_the_uninterrupted_runs_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = gpt_config(dir.path());
    let sets = [
        "model.dropout=0.2",
        "checkpoint.every_steps=1",
        "optimizer.schedule=constant",
        "optimizer.warmup_steps=0",
        "optimizer.min_lr=0",
    ];
    let whole = train_json(&config, &dir.path().join("whole"), &sets);
    let (first, resumed) = stopped_then_resumed(&config, &dir.path().join("resumed"), &sets, 5);
    assert_eq!(first["steps"], 5);
    assert_eq!(resumed["steps"], 12);
    assert_eq!(resumed["weights_sha256"], whole["weights_sha256"]);
    assert_eq!(resumed["val_loss"], whole["val_loss"]);
}
