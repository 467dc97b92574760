//! End to end: half-precision training over f32 master weights, with dynamic loss scaling.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn config(dir: &Path, training: &str) -> PathBuf {
    write(
        dir,
        "digits.toml",
        format!(
            "{}\n[model]\nhidden = [32]\n[optimizer]\nlr = 0.01\n[training]\nbatch_size = 32\n{training}\n\
             [checkpoint]\nevery_epochs = 0\n",
            digits_data()
        ),
    )
}

#[test]
fn half_precision_gives_the_same_weights_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "epochs = 4\naccumulation_steps = 2");
    for backend in ["ndarray", "flex"] {
        let mut hashes = Vec::new();
        for precision in ["f16", "bf16"] {
            let runs: Vec<serde_json::Value> = ["1", "2"]
                .iter()
                .map(|threads| {
                    let run = dir.path().join(format!("{backend}-{precision}-{threads}"));
                    train_json(
                        &config,
                        &run,
                        &[
                            &format!("training.backend={backend}"),
                            &format!("training.precision={precision}"),
                            &format!("training.threads={threads}"),
                        ],
                    )
                })
                .collect();
            let [one, two] = &runs[..] else {
                unreachable!()
            };
            assert_eq!(
                one["weights_sha256"], two["weights_sha256"],
                "{backend} {precision}"
            );
            assert_eq!(one["precision"], precision);
            let mode = if backend == "flex" {
                "native"
            } else {
                "emulated"
            };
            assert_eq!(one["precision_mode"], mode, "{backend} {precision}");
            assert!(one["test_accuracy"].as_f64().unwrap() > 0.85, "{one}");
            // f16 scales its loss (2^16 at the start, no growth in 92 steps); bf16 does not.
            match precision {
                "f16" => assert_eq!(one["loss_scale"], 65536.0),
                _ => assert!(one["loss_scale"].is_null(), "{one}"),
            }
            hashes.push(one["weights_sha256"].clone());
        }
        assert_ne!(
            hashes[0], hashes[1],
            "{backend}: f16 and bf16 round differently"
        );
    }
}

/// SGD reads a loss-scaled step's half-precision gradients (unscaling, and rounding where
/// emulated, as it reads them) as Adam does.
#[test]
fn sgd_in_half_precision_gives_the_same_weights_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "epochs = 3\nprecision = \"f16\"");
    for backend in ["ndarray", "flex"] {
        let [one, two] = ["1", "2"].map(|threads| {
            let run = dir.path().join(format!("{backend}-{threads}"));
            train_json(
                &config,
                &run,
                &[
                    "optimizer.kind=sgd",
                    "optimizer.lr=0.05",
                    &format!("training.backend={backend}"),
                    &format!("training.threads={threads}"),
                ],
            )
        });
        assert_eq!(one["weights_sha256"], two["weights_sha256"], "{backend}");
        assert_eq!(one["loss_scale"], 65536.0, "{backend}");
        assert!(one["test_accuracy"].as_f64().unwrap() > 0.85, "{one}");
    }
}

#[test]
fn a_huge_initial_scale_skips_steps_backs_off_then_trains() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "precision = \"f16\"\nepochs = 3\nthreads = 1");
    for backend in ["ndarray", "flex"] {
        let run = dir.path().join(backend);
        let summary = train_json(
            &config,
            &run,
            &[
                &format!("training.backend={backend}"),
                "precision.init_scale=1e30",
            ],
        );
        // Halving 1e30 down to where f16 gradients stop overflowing takes dozens of steps.
        let skipped = summary["skipped_steps"].as_u64().unwrap();
        assert!((40..100).contains(&skipped), "{backend}: {skipped} skipped");
        let scale = summary["loss_scale"].as_f64().unwrap();
        assert!(scale < 1e30 / 2f64.powi(40), "{backend}: scale {scale}");
        // The skipped steps left the master weights finite (a non-finite weight fails the run),
        // and the steps after them trained the model.
        assert!(summary["train_loss"].as_f64().unwrap().is_finite());
        let accuracy = summary["test_accuracy"].as_f64().unwrap();
        assert!(accuracy > 0.85, "{backend}: accuracy {accuracy}");
    }
}

/// The text output says what the scaler did: the start scale, and how many steps it skipped.
#[test]
fn the_text_output_reports_the_loss_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "precision = \"f16\"\nthreads = 1");
    let run = dir.path().join("run");
    let output = allcores(&train_command(
        &config,
        &run,
        &[],
        &["precision.init_scale=1e30", "training.max_steps=5"],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("(emulated), f32 master weights, loss scale 1e30"),
        "{err}"
    );
    // Every step overflows at 1e30: five halvings.
    let out = stdout(&output);
    assert!(
        out.contains("loss scaling: 5 of 5 steps skipped (inf or NaN gradients) · loss scale 3.125e28 at the end"),
        "{out}"
    );
}

#[test]
fn a_resumed_f16_run_continues_with_the_scaler_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    // A short growth interval, so the scale changes several times before and after the stop.
    let config = config(
        dir.path(),
        "epochs = 2\nprecision = \"f16\"\n[precision]\ngrowth_interval = 7\ninit_scale = 1e6",
    );
    let whole = train_json(&config, &dir.path().join("whole"), &[]);
    let run = dir.path().join("resumed");
    let stopped = train_json(
        &config,
        &run,
        &["training.max_steps=31", "checkpoint.every_steps=31"],
    );
    assert_eq!(stopped["steps"], 31);
    let mut args = train_args(&config, &run, &[]);
    args.push("--resume");
    let output = allcores(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let resumed = last_json(&output);
    assert!(whole["skipped_steps"].as_u64().unwrap() > 0, "{whole}");
    for key in [
        "weights_sha256",
        "loss_scale",
        "skipped_steps",
        "test_accuracy",
    ] {
        assert_eq!(resumed[key], whole[key], "{key}");
    }
}

#[test]
fn a_diverging_run_names_the_step_and_keeps_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "epochs = 2\nthreads = 1");
    let run = dir.path().join("run");
    let output = allcores(&train_args(
        &config,
        &run,
        &[
            "checkpoint.every_steps=1",
            "optimizer.kind=sgd",
            "optimizer.lr=1e30",
        ],
    ));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    let line = err.lines().last().unwrap();
    assert!(
        line.starts_with("error: training diverged at step "),
        "{err}"
    );
    let step: u64 = line["error: training diverged at step ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Every checkpoint left is from before that step.
    let checkpoints: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!checkpoints.is_empty());
    for name in checkpoints {
        let saved: u64 = name.trim_start_matches("step-").parse().unwrap();
        assert!(saved < step, "{name} written at or after step {step}");
    }
}
