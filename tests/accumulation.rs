//! End to end: accumulation trains like the large batch, and stays independent of the thread
//! count.

mod common;

use common::*;

fn accuracy_gap(model: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "mnist.toml",
        format!(
            "{}\n[model]\n{model}\n[training]\nmax_steps = 200\nthreads = 2\n\
             [checkpoint]\nevery_epochs = 0\n",
            mnist_data()
        ),
    );
    let large = train_json(
        &config,
        &dir.path().join("large"),
        &["training.batch_size=64"],
    );
    let accumulated = train_json(
        &config,
        &dir.path().join("accumulated"),
        &["training.batch_size=16", "training.accumulation_steps=4"],
    );
    assert_eq!(accumulated["effective_batch_size"], 64);
    assert_eq!(accumulated["accumulation_steps"], 4);
    assert_eq!(accumulated["samples"], large["samples"]);
    (
        large["test_accuracy"].as_f64().unwrap(),
        accumulated["test_accuracy"].as_f64().unwrap(),
    )
}

#[test]
fn two_hundred_accumulated_steps_score_as_the_large_batch() {
    for model in ["kind = \"mlp\"\nhidden = [512, 512]", "kind = \"cnn\""] {
        let (large, accumulated) = accuracy_gap(model);
        eprintln!("{model}: batch 64 {large}, 16 x 4 {accumulated}");
        // 200 steps of 64 samples train far beyond chance...
        assert!(large > 0.85, "{model}: {large}");
        // ...and the accumulated run lands within 0.3 percentage points of the large batch.
        assert!(
            (large - accumulated).abs() <= 0.003,
            "{model}: {large} vs {accumulated}"
        );
    }
}

#[test]
fn accumulation_gives_the_same_weights_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "mnist.toml",
        format!(
            "{}\n[model]\nhidden = [64]\n[training]\nmax_steps = 15\nbatch_size = 16\n\
             accumulation_steps = 4\n",
            mnist_data()
        ),
    );
    let one = train_json(&config, &dir.path().join("t1"), &["training.threads=1"]);
    let two = train_json(&config, &dir.path().join("t2"), &["training.threads=2"]);
    assert_eq!(one["weights_sha256"], two["weights_sha256"]);
    let plain = train_json(
        &config,
        &dir.path().join("k1"),
        &["training.accumulation_steps=1"],
    );
    assert_ne!(one["weights_sha256"], plain["weights_sha256"]);
}
