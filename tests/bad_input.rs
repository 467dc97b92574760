//! End to end: every bad input ends with one line naming the problem, exit status 2, no panic,
//! and no run folder left behind.

mod common;

use std::path::Path;

use common::*;

/// Runs `train` on `config` with `sets` and checks the failure; returns the error line.
fn refused(dir: &Path, config: &Path, sets: &[&str], expected: &str) -> String {
    let run = dir.join("run");
    let mut args = vec![
        "train",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ];
    for set in sets {
        args.push("--set");
        args.push(set);
    }
    let output = allcores(&args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{sets:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{sets:?}: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(expected),
        "{sets:?}: expected '{expected}' in: {err}"
    );
    assert!(!run.exists(), "a failed run left {}", run.display());
    err
}

fn digits_config(dir: &Path) -> std::path::PathBuf {
    write(
        dir,
        "digits.toml",
        format!("{}\n[model]\nhidden = [16]\n", digits_data()),
    )
}

#[test]
fn config_files_that_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        dir.path(),
        &dir.path().join("missing.toml"),
        &[],
        "config file not found",
    );
    let invalid = write(dir.path(), "invalid.toml", "[data\nformat = \"idx\"\n");
    let err = refused(dir.path(), &invalid, &[], "invalid.toml");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn unknown_keys_and_wrong_types() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = write(
        dir.path(),
        "unknown.toml",
        format!("{}\n[training]\nthreds = 2\n", digits_data()),
    );
    refused(dir.path(), &unknown, &[], "unknown field `threds`");
    let config = digits_config(dir.path());
    refused(
        dir.path(),
        &config,
        &["training.batch_size=\"many\""],
        "batch_size",
    );
    refused(dir.path(), &config, &["model.hidden=12"], "hidden");
}

#[test]
fn out_of_range_values() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    for (set, expected) in [
        ("training.threads=0", "training.threads"),
        ("training.threads=-3", "training.threads"),
        ("training.threads=lots", "training.threads"),
        (
            "training.batch_size=0",
            "training.batch_size: must be at least 1",
        ),
        ("optimizer.lr=0", "optimizer.lr: must be a positive number"),
        (
            "optimizer.lr=-0.1",
            "optimizer.lr: must be a positive number",
        ),
        (
            "training.accumulation_steps=0",
            "training.accumulation_steps",
        ),
        ("training.accumulation_steps=-1", "accumulation_steps"),
        ("training.accumulation_steps=2.5", "accumulation_steps"),
        (
            "model.kind=transformer",
            "`transformer`, expected one of `mlp`, `cnn`, `gpt`",
        ),
        (
            "training.backend=cuda",
            "`cuda`, expected `ndarray` or `flex`",
        ),
        (
            "optimizer.kind=lbfgs",
            "`lbfgs`, expected one of `sgd`, `adam`, `adamw`",
        ),
    ] {
        refused(dir.path(), &config, &[set], expected);
    }
}

#[test]
fn missing_and_malformed_idx_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "mnist.toml", mnist_data());
    let missing = dir.path().join("nope.idx");
    refused(
        dir.path(),
        &config,
        &[&format!("data.train_images=\"{}\"", missing.display())],
        "nope.idx: dataset file not found",
    );

    let images_of_side = |count: u32, side: u32, pixels: usize| {
        let mut bytes = 0x0803u32.to_be_bytes().to_vec();
        for d in [count, side, side] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend(std::iter::repeat_n(7u8, pixels));
        bytes
    };
    let images = |count: u32, pixels: usize| images_of_side(count, 28, pixels);
    let labels = |values: &[u8]| {
        let mut bytes = 0x0801u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&(values.len() as u32).to_be_bytes());
        bytes.extend_from_slice(values);
        bytes
    };
    let good_images = write(dir.path(), "good-images", images(3, 3 * 784));
    let good_labels = write(dir.path(), "good-labels", labels(&[1, 2, 3]));
    let with = |images: &Path, labels: &Path| {
        [
            format!("data.train_images=\"{}\"", images.display()),
            format!("data.train_labels=\"{}\"", labels.display()),
        ]
    };
    let check = |images: &Path, labels: &Path, expected: &str| {
        let sets = with(images, labels);
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        refused(dir.path(), &config, &sets, expected);
    };
    check(&good_labels, &good_labels, "wrong IDX magic number");
    let short = write(dir.path(), "short-images", images(3, 3 * 784 - 10));
    check(&short, &good_labels, "truncated");
    let four = write(dir.path(), "four-labels", labels(&[1, 2, 3, 4]));
    check(&good_images, &four, "holds 4 labels but");
    let eleven = write(dir.path(), "bad-labels", labels(&[1, 11, 3]));
    check(
        &good_images,
        &eleven,
        "label 11 of sample 1 lies outside the class range 0..10",
    );
    // Test images of another size than the training images: refused before training, where
    // the first scoring pass used to panic.
    let small = write(dir.path(), "small-images", images_of_side(3, 20, 3 * 400));
    refused(
        dir.path(),
        &config,
        &[
            &format!("data.test_images=\"{}\"", small.display()),
            &format!("data.test_labels=\"{}\"", good_labels.display()),
        ],
        "small-images: images are 20x20, the training images 28x28",
    );
}

#[test]
fn malformed_csv_rows() {
    let dir = tempfile::tempdir().unwrap();
    let ragged = write(dir.path(), "ragged.csv", "1,2,3,4,0\n1,2,3,1\n");
    let config = write(
        dir.path(),
        "csv.toml",
        format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.5\n",
            ragged.display()
        ),
    );
    refused(dir.path(), &config, &[], "line 2: 4 columns, expected 5");
    let files = [
        (
            "label.csv",
            "1,2,3,4,0\n1,2,3,4,12\n",
            "line 2: label 12 lies outside the class range",
        ),
        // A missing value is bad input (status 2) named by its cell, not a diverging run.
        (
            "missing.csv",
            "1,2,3,4,0\n1,NaN,3,4,1\n",
            "line 2, column 2: 'NaN' is not a finite number",
        ),
        (
            "one.csv",
            "1,2,3,4,0\n",
            "one.csv: 1 row is too few to split with data.test_fraction = 0.5",
        ),
    ];
    for (name, rows, expected) in files {
        let file = write(dir.path(), name, rows);
        let set = format!("data.train_csv=\"{}\"", file.display());
        refused(dir.path(), &config, &[&set], expected);
    }
}

#[test]
fn a_model_that_does_not_fit_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let cnn = write(
        dir.path(),
        "cnn.toml",
        format!("{}\n[model]\nkind = \"cnn\"\n", digits_data()),
    );
    refused(dir.path(), &cnn, &[], "does not fit 8x8 inputs");
    // The MLP config's hidden layers would be ignored by the CNN: refused, not dropped.
    let mlp = digits_config(dir.path());
    refused(
        dir.path(),
        &mlp,
        &["model.kind=cnn"],
        "model.hidden: applies to model.kind = \"mlp\" only; this config trains \"cnn\"",
    );
}

/// A layer size with a few zeros too many is refused at once, naming the memory it would take,
/// where it used to abort on an allocation of 313 GB, or grind until the out-of-memory killer.
#[test]
fn a_model_too_large_for_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    let err = refused(
        dir.path(),
        &config,
        &["model.hidden=[1000000000000]"],
        "model: this run needs at least 1,594,424 GiB (75,000,000,000,010 parameters: their f32 \
         weights, gradients and Adam's two moments take 1,117,587 GiB;",
    );
    assert!(err.contains("GiB this process may use"), "{err}");
}

#[test]
fn run_folders_are_never_overwritten_and_eval_needs_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    let occupied = dir.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    write(&occupied, "notes.txt", "mine");
    let output = allcores(&train_command(&config, &occupied, &[], &[]));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("not empty"), "{}", stderr(&output));
    assert_eq!(
        std::fs::read_to_string(occupied.join("notes.txt")).unwrap(),
        "mine"
    );

    let output = allcores(&["eval", dir.path().join("none").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no such run folder"));
    let output = allcores(&["eval", occupied.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("holds no run"));
}

#[test]
fn bad_precision_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    refused(dir.path(), &config, &["training.precision=f8"], "precision");
    refused(
        dir.path(),
        &config,
        &["training.precision=f16", "precision.init_scale=0"],
        "precision.init_scale: must be a positive number",
    );
    refused(
        dir.path(),
        &config,
        &["precision.init_scale=-65536"],
        "precision.init_scale",
    );
    refused(
        dir.path(),
        &config,
        &["precision.growth_interval=0"],
        "precision.growth_interval: must be at least 1",
    );
    refused(
        dir.path(),
        &config,
        &["precision.backoff_factor=1.5"],
        "precision.backoff_factor",
    );
    refused(
        dir.path(),
        &config,
        &["precision.loss_scaling=sometimes"],
        "loss_scaling",
    );
}

#[test]
fn bad_shards_execution_and_idle_threads() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    refused(
        dir.path(),
        &config,
        &["training.shards=0"],
        "training.shards: must be at least 1",
    );
    refused(
        dir.path(),
        &config,
        &["training.batch_size=8", "training.shards=9"],
        "training.shards: must be at most training.batch_size (8), got 9",
    );
    refused(
        dir.path(),
        &config,
        &["training.execution=parallel"],
        "execution",
    );
    refused(
        dir.path(),
        &config,
        &["training.idle_threads=spin"],
        "`spin`, expected `poll` or `sleep` for key `training.idle_threads`",
    );
}

/// Hostile values that used to panic, allocate without bound or run a silently wrong run.
#[test]
fn values_that_overflow_index_or_exhaust_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = digits_config(dir.path());
    let huge = (u64::MAX / 2).to_string();
    // In a release build batch x accumulation wrapped: the run stopped after 2 of its steps.
    refused(
        dir.path(),
        &config,
        &[
            &format!("training.batch_size={huge}"),
            "training.accumulation_steps=4",
        ],
        "training.accumulation_steps: training.batch_size x training.accumulation_steps",
    );
    refused(
        dir.path(),
        &config,
        &[&format!("training.epochs={}", i64::MAX)],
        "training.epochs: 9223372036854775807 epochs of 23 steps are more steps than a run can count",
    );
    // config-rs grew the list up to the index: gigabytes from a 30-byte argument.
    refused(
        dir.path(),
        &config,
        &["model.hidden[1000000000]=5"],
        "'model.hidden[1000000000]' indexes a list",
    );
    let output = allcores_env(
        &[
            "train",
            config.to_str().unwrap(),
            "--out",
            dir.path().join("run").to_str().unwrap(),
        ],
        &[("ALLCORES__MODEL__HIDDEN[999999999]", "5")],
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("ALLCORES__MODEL__HIDDEN[999999999]: "),
        "{err}"
    );
    // A shard count of 10^18 reserved room for 10^18 pieces: "capacity overflow" (exit 101).
    let output = allcores(&train_command(
        &config,
        &dir.path().join("shards"),
        &["--json", "--quiet"],
        &[
            "training.batch_size=1000000000000000000",
            "training.shards=1000000000000000000",
            "training.threads=1",
            "training.max_steps=1",
        ],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(last_json(&output)["steps"], 1);
    // A tiny scale made the features infinite: the run "diverged at step 1" (exit 1).
    refused(
        dir.path(),
        &config,
        &["data.scale=4e-38"],
        "data.scale: 4e-38 makes a feature infinite",
    );
    // A wide layer on one feature: its parameters (6.4 GB with gradients and Adam's moments)
    // passed the old check, its activations at a batch of 100 (80 GB) aborted the process.
    let rows: String = (0..200)
        .map(|i| format!("{}.5,{}\n", i % 7, i % 2))
        .collect();
    let narrow = write(dir.path(), "narrow.csv", rows);
    let config = write(
        dir.path(),
        "narrow.toml",
        format!(
            "[data]\nformat = \"csv\"\ntrain_csv = \"{}\"\ntest_fraction = 0.5\n",
            narrow.display()
        ),
    );
    refused(
        dir.path(),
        &config,
        &["model.hidden=[100000000]", "training.batch_size=100"],
        "of activations for 100 samples in flight",
    );
}
